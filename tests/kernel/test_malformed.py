"""Bad packets are never a way around a rule: every unreadable case of tests/packet_cases.py,
run through the real program (tunnel and Ethernet builds) under a policy that would allow the
packet if it were read, must get exactly the reference's verdict and reason."""
import ipaddress

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Dot1Q, Ether

from control.compiler import compile_policy
from control.model import Device, Identities, Policy, Rule, User
from control.probe import kernel_verdicts
from control.reference import decide
from dataplane.reasons import Reason, Verdict
from tests.packet_cases import D4, READABLE, S4, S6, UNREADABLE

IDS = Identities((User("a@example.com", ()),),
                 (Device("a", "a@example.com", ipaddress.IPv4Address(S4), ipaddress.IPv6Address(S6)),))
ALLOW_ALL = Policy("block", (Rule("everything", 1, "allow"),))


def run(program, data: bytes):
    tables = compile_policy(ALLOW_ALL, IDS, program.layout)
    program.load(tables)
    return kernel_verdicts(program, tables, [bytes(data)])[0]


@pytest.mark.parametrize("data, label", [c[1:] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE])
@pytest.mark.parametrize("build", ["tunnel", "ethernet"])
def test_unreadable_packets_are_dropped_with_their_reason(program, eth_program, build, data, label):
    got = run(program if build == "tunnel" else eth_program, data)
    assert got["reason"] == label
    assert got["verdict"] in ("malformed", "fragment") and got["rule"] is None
    assert got == decide(ALLOW_ALL, IDS, bytes(data)).as_json()


@pytest.mark.parametrize("data, expected", [c[1:] for c in READABLE], ids=[c[0] for c in READABLE])
@pytest.mark.parametrize("build", ["tunnel", "ethernet"])
def test_readable_packets_are_decided(program, eth_program, build, data, expected):
    assert run(program if build == "tunnel" else eth_program, data) == \
        {"verdict": "allow", "rule": "everything", "reason": "rule"}


def test_every_truncation_of_valid_packets(program):
    """Each prefix of a valid packet: the kernel never says more than the reference."""
    tables = compile_policy(ALLOW_ALL, IDS, program.layout)
    program.load(tables)
    for _, data, _ in READABLE:
        cuts = [bytes(data)[:n] for n in range(len(data) + 1)]
        for cut, got in zip(cuts, kernel_verdicts(program, tables, cuts)):
            assert got == decide(ALLOW_ALL, IDS, cut).as_json(), cut.hex()


def frame_result(eth_program, frame: bytes):
    """Run a whole Ethernet frame (not built from an IP packet) through the Ethernet build."""
    tables = compile_policy(ALLOW_ALL, IDS, eth_program.layout)
    eth_program.load(tables)
    with eth_program.on_one_cpu() as cpu:
        return eth_program.run(frame, cpu=cpu, raw_frame=True)


SYN_V4 = IP(src=S4, dst=D4) / TCP(sport=40000, dport=22, flags="S")
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


@pytest.mark.parametrize("frame, verdict, reason", [
    (bytes(ETH / SYN_V4), Verdict.ALLOW, Reason.RULE),
    (bytes(ETH / Dot1Q(vlan=7) / SYN_V4), Verdict.ALLOW, Reason.RULE),
    (bytes(ETH / Dot1Q(vlan=7) / Dot1Q(vlan=8) / SYN_V4), Verdict.ALLOW, Reason.RULE),
    # Past the tags the parser walks an IP packet could hide: dropped, never passed unread.
    (bytes(ETH / Dot1Q(vlan=7) / Dot1Q(vlan=8) / Dot1Q(vlan=9) / SYN_V4), Verdict.MALFORMED, Reason.ETH_VLAN_DEPTH),
    (bytes(ETH / Dot1Q(vlan=7))[:16], Verdict.MALFORMED, Reason.ETH_SHORT),
    (bytes(ETH / ARP()), Verdict.PASS, Reason.NOT_IP),
    # The ethertype says IPv6, the header says 4: not read as either.
    (bytes(Ether(type=0x86DD) / SYN_V4), Verdict.MALFORMED, Reason.BAD_VERSION),
])
def test_ethernet_frames(eth_program, frame, verdict, reason):
    got = frame_result(eth_program, frame)
    assert (got.verdict, got.reason) == (verdict, reason)
    assert got.retval == (2 if verdict in (Verdict.ALLOW, Verdict.PASS) else 1)  # XDP_PASS / XDP_DROP


def test_runs_are_counted_per_rule_and_reason(program):
    """The counters move with each decision: the same numbers flow logs and metrics will read."""
    tables = compile_policy(ALLOW_ALL, IDS, program.layout)
    program.load(tables)
    with program.on_one_cpu() as cpu:        # packets, not probes (which are dry runs): counted
        for data in [bytes(SYN_V4)] * 3 + [b"\x45"]:
            program.run(data, cpu=cpu)
    rule_packets = sum(c.packets for c in program.bpf["zt_rule_stats"][1])
    state = program.bpf["zt_cpu_state"][0]
    assert rule_packets == 3
    assert sum(cpu.reason[Reason.RULE].packets for cpu in state) == 3
    assert sum(cpu.reason[Reason.IPV4_SHORT].packets for cpu in state) == 1
