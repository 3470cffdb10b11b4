"""A restarted controller adopts the pinned build (dataplane/pinned.py): no compiler run, the
same program and maps, the next policy written into its other bank; anything that is not the
recorded build of this source and these flags, or that cannot hold the policy, is refused."""
import ipaddress
import json
from dataclasses import replace

import pytest

import dataplane.pinned as pinned
from control.compiler import compile_policy
from control.model import Device, Identities, Policy, Rule, User
from dataplane.pinned import adopt, forget_record, record_path
from dataplane.program import Program
from tests.kernel.test_attach import ALLOWED, BLOCKED, GW, IDS, PEER, POLICY, pin_dir, udp_to_gw  # noqa: F401
from tests.programs import TEST_LAYOUT, XDP_DROP, XDP_PASS, run_on_one_cpu

OUTSIDE = "198.51.100.7"     # a device address outside the pools: its entry is in zt_src_hash
IDS2 = Identities(IDS.users, IDS.devices + (Device("ann-phone", "ann@example.com", ipaddress.IPv4Address(OUTSIDE)),))
BLOCK_ALL = Policy("block", (Rule("app", 1, "block", protocols=frozenset({"udp"}), dst_ports=((ALLOWED, ALLOWED),)),))


def _verdicts(program) -> list[int]:
    return [run_on_one_cpu(program, udp_to_gw(port)).retval for port in (ALLOWED, BLOCKED)]


@pytest.fixture
def pinned_build(pin_dir):
    """Build 7 loaded and pinned as a gateway does, and its controller gone (the pins hold it)."""
    tables = compile_policy(POLICY, IDS2, TEST_LAYOUT)
    with Program(TEST_LAYOUT, build=7, pin_dir=pin_dir) as first:
        first.load(tables)
        first.pin(pin_dir)
        assert _verdicts(first) == [XDP_PASS, XDP_DROP]
        ident = first.id
    yield ident, tables
    forget_record(pin_dir)


def test_the_pinned_build_is_adopted_and_changed_in_place_without_a_compile(pin_dir, pinned_build, monkeypatch):
    ident, tables = pinned_build

    def no_compile(*args, **kwargs):
        raise AssertionError("adopting must not compile")

    monkeypatch.setattr(Program, "__init__", no_compile)
    program, why = adopt(pin_dir, tables.need)
    assert why == "" and program is not None
    with program:
        assert (program.id, program.build, program.bank, program.layout) == (ident, 7, 0, TEST_LAYOUT)
        assert _verdicts(program) == [XDP_PASS, XDP_DROP]
        # what the last controller wrote is known: the next build writes only its differences
        assert program.policy_tables.hashed() == 1
        assert program.stage(tables) > 0          # (the other bank was empty)
        assert program.stage(tables) == 0
        # the next policy (ann-phone gone) into the bank not in force, then one flip
        changed = compile_policy(BLOCK_ALL, IDS, TEST_LAYOUT)
        program.stage(changed)
        assert _verdicts(program) == [XDP_PASS, XDP_DROP]
        program.flip(8)
        assert _verdicts(program) == [XDP_DROP, XDP_DROP]
        assert program.policy_tables.hashed() == 0
        # the reply entry's tail calls outlived the controller that filled them (pinned)
        assert len(list(program.bpf["zt_reply_slow"].items())) == 2
        program.pin(pin_dir)
    again, why = adopt(pin_dir, changed.need)
    with again:
        assert (again.id, again.build, again.bank) == (ident, 8, 1)


def test_a_changed_source_flags_layout_or_pin_is_not_adopted(pin_dir, pinned_build, monkeypatch):
    _, tables = pinned_build
    need = tables.need
    refused = {
        "layout": replace(need, max_rules=TEST_LAYOUT.max_rules + 1),
        "settings": replace(need, ct_udp_seconds=need.ct_udp_seconds + 1),
        "pools": replace(need, pool4_base=need.pool4_base + (1 << 20)),
    }
    for what, other in refused.items():
        program, why = adopt(pin_dir, other)
        assert program is None and ("does not hold" in why), (what, why)
    source = pinned.ztgate_source()
    monkeypatch.setattr(pinned, "ztgate_source", lambda: source + "/* edited */\n")
    program, why = adopt(pin_dir, need)
    assert program is None and "source or the flags" in why
    monkeypatch.undo()
    # a record that is not of the pinned objects (a crash between pinning and recording)
    record = json.loads(record_path(pin_dir).read_text())
    record["ids"]["prog"] += 1
    record_path(pin_dir).write_text(json.dumps(record))
    program, why = adopt(pin_dir, need)
    assert program is None and "not the recorded build's" in why
    forget_record(pin_dir)
    program, why = adopt(pin_dir, need)
    assert program is None and "no record" in why
