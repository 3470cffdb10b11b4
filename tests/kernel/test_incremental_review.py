"""Review findings on incremental rule changes (control/incremental.py) and adoption
(dataplane/pinned.py), each reproduced through the real kernel against the reference."""
import ipaddress
from dataclasses import replace

import pytest

from control.compiler import compile_policy
from control.incremental import Incremental
from control.model import ICMP, TCP, UDP, Packet, Principal, Rule
from control.probe import kernel_verdicts, reference_verdicts
from dataplane.program import Program
from tests.app_policy import IDS, POLICY
from tests.kernel.test_adopt import pinned_build  # noqa: F401
from tests.kernel.test_attach import pin_dir  # noqa: F401
from tests.programs import TEST_LAYOUT

DSTS = [ipaddress.ip_address(a) for a in ("10.20.0.10", "10.99.99.1", "fd20::10")]


def probes(ids=IDS, dsts=DSTS, ports=(22, 443, 8080, 5353)):
    return [Packet(a, dst, proto, 40000, port) for d in ids.devices for a in d.addresses for dst in dsts
            if dst.version == a.version for proto in (TCP, UDP) for port in ports] + \
           [Packet(a, dst, ICMP, 0, 0) for d in ids.devices for a in d.addresses for dst in dsts
            if dst.version == a.version]


def staged(program, inc, policy, ids, number):
    """POLICY staged incrementally and flipped, as control/kernel.py does: the tables in force."""
    change = inc.stage(policy, ids, [])
    old = program.bank
    program.flip(number)
    inc.applied(change, policy, old)
    return change.tables


@pytest.fixture(scope="module")
def named_program():
    """A program built for a policy with hostnames (name_words 1): each bank holds every service
    list twice, and a destination learned for no name walks the second copy."""
    with Program(replace(TEST_LAYOUT, name_words=1)) as program:
        yield program


def test_a_change_in_a_program_built_for_hostnames_writes_the_lists_without_names_too(named_program):
    """The policy in force has no hostnames (the rule that had them went by a whole build into the
    same program, or the pinned program was adopted): rule changes are incremental, and every
    packet (its destination learned for no name) walks the lists without names."""
    program = named_program
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    inc = Incremental(tables, POLICY, IDS, program)
    pkts = probes()
    assert kernel_verdicts(program, tables, pkts) == reference_verdicts(POLICY, IDS, pkts)
    block = Rule("block-web", 5, "block", principals=(Principal("user", "bob@example.com"),),
                 protocols=frozenset({"tcp"}), dst_ports=((8080, 8080),))
    policy = POLICY
    for number, rules in enumerate([POLICY.rules + (block,), POLICY.rules, POLICY.rules + (replace(block, precedence=50),)],
                                   start=program.build + 1):
        policy = replace(POLICY, rules=rules)
        tables = staged(program, inc, policy, IDS, number)
        assert kernel_verdicts(program, tables, pkts) == reference_verdicts(policy, IDS, pkts), rules[-1].name


# ---------------------------------------------------------------------------------------------
# rule changes interleaved with device, membership and session changes, and whole builds,
# through Kernel as the gateway stages them

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from control.model import Device, Identities, User  # noqa: E402
from tests.kernel.test_differential import GROUPS, identities, packets, policies  # noqa: E402

SPARE_V4 = ["100.96.0.5", "100.96.0.6", "100.96.0.7", "198.51.100.7"]     # (the last: outside the pools)


@pytest.fixture(scope="module")
def shared_program():
    with Program(TEST_LAYOUT) as program:
        yield program


def kernel_on(program, policy, ids, tmp):
    """A Kernel attached to nothing whose build in force is POLICY compiled into PROGRAM."""
    from control.config import Config
    from control.kernel import Build, Kernel

    kernel = Kernel(Config(bpf_pin_dir=tmp))
    tables = compile_policy(policy, ids, program.layout)
    program.load(tables)
    kernel.build = Build(program.build, program, tables, 0.0, 0.0, program.bank)
    kernel._remember(kernel.build)
    kernel._begin_changes(kernel.build, policy, ids)
    return kernel


def rule_step(data, ids, policy, step):
    rules = list(policy.rules)
    kind = data.draw(st.sampled_from(["add", "name", "remove", "enable", "disable", "move"] if rules else ["add", "name"]))
    if kind == "name":      # one user or device named: its sources leave the class they shared
        who = data.draw(st.sampled_from([Principal("user", u.key) for u in ids.users] +
                                        [Principal("device", d.name) for d in ids.devices]))
        new = data.draw(policies(ids)).rules
        if not new:
            return policy
        rules.append(replace(new[0], name=f"s{step}", precedence=data.draw(st.integers(1, 100_000)),
                             principals=(who,), src_cidrs=None))
    elif kind == "add":
        new = data.draw(policies(ids)).rules
        if not new:
            return policy
        rules.append(replace(new[0], name=f"s{step}", precedence=data.draw(st.integers(1, 100_000))))
    else:
        i = data.draw(st.integers(0, len(rules) - 1))
        if kind == "remove":
            del rules[i]
        elif kind == "move":
            rules[i] = replace(rules[i], precedence=data.draw(st.integers(1, 100_000)))
        else:
            rules[i] = replace(rules[i], enabled=kind == "enable")
    if len({r.precedence for r in rules}) != len(rules):
        return policy
    return replace(policy, rules=tuple(rules))


def device_step(data, ids, step):
    """A device added, enabled or disabled, a session over or renewed, or a user's groups
    changed: the new identities and the devices touched."""
    devices = list(ids.devices)
    kind = data.draw(st.sampled_from(["add", "toggle", "session", "groups"]))
    if kind == "add":
        free = [a for a in SPARE_V4 if ipaddress.ip_address(a) not in {d.tunnel_ipv4 for d in devices}]
        if not free:
            return ids, []
        d = Device(f"x{step}", data.draw(st.sampled_from(ids.users)).key, ipaddress.IPv4Address(data.draw(
            st.sampled_from(free))))
        return Identities(ids.users, tuple(devices + [d])), [d]
    if kind == "groups":
        user = data.draw(st.sampled_from(ids.users))
        new = replace(user, groups=tuple(data.draw(st.sets(st.sampled_from(GROUPS), max_size=3))))
        users = tuple(new if u.key == user.key else u for u in ids.users)
        return Identities(users, ids.devices), [d for d in ids.devices if d.user == user.key]
    i = data.draw(st.integers(0, len(devices) - 1))
    d = devices[i]
    if kind == "toggle":
        d = replace(d, enabled=not d.enabled)
    else:
        d = replace(d, session_expires=None if d.session_expires else 1.0)
    devices[i] = d
    return Identities(ids.users, tuple(devices)), [d]


@settings(max_examples=int(__import__("os").environ.get("REVIEW_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.data())
def test_rule_changes_between_device_membership_session_changes_and_whole_builds(shared_program, tmp_path, data):
    program = shared_program
    ids = data.draw(identities())
    policy = data.draw(policies(ids))
    kernel = kernel_on(program, policy, ids, tmp_path)
    number = program.build
    for step in range(data.draw(st.integers(2, 10))):
        number += 1
        what = data.draw(st.sampled_from(["rule", "rule", "rule", "device", "device", "whole"]))
        if what == "rule":
            policy = rule_step(data, ids, policy, step)
            kernel.stage_swap(ids, policy, number).apply()
        elif what == "device":
            ids, touched = device_step(data, ids, step)
            if touched:
                kernel.stage_devices(ids, policy, touched).apply()
        else:   # the default action: a whole compile, into the program in force
            policy = replace(policy, default_action="allow" if policy.default_action == "block" else "block")
            kernel.stage_swap(ids, policy, number).apply()
        pkts = data.draw(st.lists(packets(ids, policy), min_size=10, max_size=16))
        got = kernel_verdicts(program, kernel.build.tables, pkts)
        assert got == reference_verdicts(policy, ids, pkts), f"step {step}: {what}"


@pytest.fixture(scope="module")
def few_nodes():
    """A program with room for 256 trie nodes past the first strides."""
    with Program(replace(TEST_LAYOUT, max_nodes=768)) as program:
        yield program


def test_blocking_one_address_after_another_reuses_trie_nodes(few_nodes):
    """An operator blocks an attacker's address, lifts the block, blocks the next one: each /32
    splits two trie nodes, which must be given again once no slot points to them (the trie
    merged back), not kept until the program runs out of nodes and the change needs a whole
    compile. And a change that does run out says why (NotIncremental), as for other tables."""
    from control.incremental import NotIncremental

    program = few_nodes
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    inc = Incremental(tables, POLICY, IDS, program)
    number, policy = program.build, POLICY
    for i in range(200):
        dst = ipaddress.ip_network(f"10.{50 + i // 100}.{i % 100}.7/32")
        block = Rule("attacker", 1, "block", dst_cidrs=(dst,))
        for rules in (POLICY.rules + (block,), POLICY.rules):
            number += 1
            policy = replace(POLICY, rules=rules)
            tables = staged(program, inc, policy, IDS, number)
        if i % 50 == 0:
            pkts = probes(dsts=DSTS + [dst.network_address, dst.network_address + 1])
            assert kernel_verdicts(program, tables, pkts) == reference_verdicts(policy, IDS, pkts)
    assert inc.n_nodes <= 512 + 4, inc.n_nodes
    # 300 addresses at once split more nodes than the program has: refused, saying why
    many = Rule("many", 1, "block", dst_cidrs=tuple(ipaddress.ip_network(f"10.{60 + i // 200}.{i % 200}.7/32")
                                                    for i in range(300)))
    with pytest.raises(NotIncremental, match="trie nodes"):
        inc.stage(replace(POLICY, rules=POLICY.rules + (many,)), IDS, [])


def test_a_change_staged_then_discarded_leaves_the_identity_classes_in_force_alone(shared_program, tmp_path):
    """A rule naming a new principal is staged (bob's device leaves the identity class it shares
    with carl's for one with the new bit, written only into the bank not in force) and then
    discarded (the store did not commit, or the whole compile it fell back to failed). A device
    added for bob after that must get the classes of the build in force: the staff rule in
    force still applies to it."""
    from control.model import Device, Identities, User

    ids = Identities(IDS.users + (User("carl@example.com", ()),), IDS.devices + (
        Device("carl-pc", "carl@example.com", ipaddress.IPv4Address("100.96.0.5")),))
    ids = Identities(tuple(replace(u, groups=u.groups + ("staff",)) if u.key != "ann@example.com" else u
                           for u in ids.users), ids.devices)
    staff = Rule("staff-no-web", 1, "block", principals=(Principal("group", "staff"),), protocols=frozenset({"tcp"}),
                 dst_ports=((8080, 8080),))
    policy = replace(POLICY, rules=POLICY.rules + (staff,))
    kernel = kernel_on(shared_program, policy, ids, tmp_path)
    bob = Rule("bob-https", 2, "allow", principals=(Principal("user", "bob@example.com"),),
               protocols=frozenset({"tcp"}), dst_ports=((443, 443),))
    staged_change = kernel.stage_swap(ids, replace(policy, rules=policy.rules + (bob,)), shared_program.build + 1)
    staged_change.discard()
    tablet = Device("bob-tablet", "bob@example.com", ipaddress.IPv4Address("100.96.0.9"))
    ids = Identities(ids.users, ids.devices + (tablet,))
    kernel.stage_devices(ids, policy, [tablet]).apply()
    pkts = probes(ids)
    assert kernel_verdicts(shared_program, kernel.build.tables, pkts) == reference_verdicts(policy, ids, pkts)


def test_a_device_change_staged_then_discarded_leaves_no_class_unwritten(shared_program, tmp_path):
    """A device add is staged (its new identity class made) and discarded (its peer step could
    not be staged, or the store did not commit); added again, the device must get a class whose
    row is in the kernel: the rule naming the device applies to it."""
    from control.model import Device, Identities

    tablet = Device("bob-tablet", "bob@example.com", ipaddress.IPv4Address("100.96.0.9"))
    deny = Rule("tablet-no-web", 1, "block", principals=(Principal("device", "bob-tablet"),),
                protocols=frozenset({"tcp"}), dst_ports=((8080, 8080),))
    policy = replace(POLICY, rules=POLICY.rules + (deny,))
    kernel = kernel_on(shared_program, policy, IDS, tmp_path)
    ids = Identities(IDS.users, IDS.devices + (tablet,))
    kernel.stage_devices(ids, policy, [tablet]).discard()
    kernel.stage_devices(ids, policy, [tablet]).apply()
    pkts = probes(ids)
    assert kernel_verdicts(shared_program, kernel.build.tables, pkts) == reference_verdicts(policy, ids, pkts)


def test_a_record_of_another_shape_is_refused_not_raised(pin_dir, pinned_build):  # noqa: F811
    """A record that is JSON but not of this schema (hand-edited, truncated to another object, a
    field gone) is not adopted, saying why: the controller compiles instead of failing to start."""
    import json

    from dataplane.pinned import adopt, record_path

    _, tables = pinned_build
    good = json.loads(record_path(pin_dir).read_text())
    broken = [[1, 2], "text", {k: v for k, v in good.items() if k != "hash"},
              {k: v for k, v in good.items() if k != "ids"}, dict(good, ids=None), dict(good, layout=[1])]
    for record in broken:
        record_path(pin_dir).write_text(json.dumps(record))
        program, why = adopt(pin_dir, tables.need)
        assert program is None and why, record
    record_path(pin_dir).write_text(json.dumps(good))
    program, why = adopt(pin_dir, tables.need)
    assert why == "" and program is not None
    program.close()


def test_changes_after_adopting_the_pinned_program_stay_right(pin_dir, pinned_build):  # noqa: F811
    """A restarted controller adopts the pinned program (the last controller's build in one
    bank), writes the policy into the other and flips, then takes rule changes in place: one
    naming a new principal (ann's devices, one of them outside the pools, leave their class),
    one removing it, a block: each equals the reference."""
    from dataplane.pinned import adopt
    from tests.kernel.test_adopt import IDS2
    from tests.kernel.test_attach import POLICY as ONE_RULE

    _, tables = pinned_build
    program, why = adopt(pin_dir, tables.need)
    assert why == ""
    with program:
        tables = compile_policy(ONE_RULE, IDS2, program.layout)
        old = program.bank
        program.stage(tables)
        program.flip(program.build + 1)
        assert program.bank != old
        inc = Incremental(tables, ONE_RULE, IDS2, program)
        ann = Rule("ann-tcp", 5, "allow", principals=(Principal("user", "ann@example.com"),),
                   protocols=frozenset({"tcp"}))
        block = Rule("no-udp-here", 2, "block", protocols=frozenset({"udp"}),
                     dst_cidrs=(ipaddress.ip_network("10.20.0.0/24"),))
        dsts = [ipaddress.ip_address(a) for a in ("10.20.0.10", "10.99.0.1", "192.0.2.1")]
        pkts = probes(IDS2, dsts, ports=(22, 5001, 5002))
        for number, rules in enumerate([ONE_RULE.rules + (ann,), ONE_RULE.rules + (ann, block), ONE_RULE.rules + (block,),
                                        ONE_RULE.rules], start=program.build + 1):
            policy = replace(ONE_RULE, rules=rules)
            got = kernel_verdicts(program, staged(program, inc, policy, IDS2, number), pkts)
            assert got == reference_verdicts(policy, IDS2, pkts), [r.name for r in rules]


def test_counters_follow_rule_names_when_ids_are_given_again(shared_program, tmp_path):
    """Rule a's id is freed when it goes and given to rule b: the counters say a for what a
    allowed and b for what b allowed, across the changes after (ztgate stats, the metrics)."""
    from control.kernel import run_packets
    from control.probe import probe_bytes

    a = Rule("a", 3, "allow", protocols=frozenset({"udp"}), dst_ports=((5001, 5001),))
    kernel = kernel_on(shared_program, replace(POLICY, rules=(a,)), IDS, tmp_path)
    pkt = [Packet(ipaddress.ip_address("100.96.0.2"), ipaddress.ip_address("10.20.0.10"), UDP, 40000, 5001)]

    def send(n):
        run_packets(shared_program, [probe_bytes(p) for p in pkt] * n, repeat=1)
    send(3)
    number = shared_program.build
    b = replace(a, name="b", precedence=4)
    for rules, sent in [((), 0), ((b,), 2), ((b, replace(a, precedence=9)), 5), ((replace(a, precedence=9),), 7)]:
        number += 1
        kernel.stage_swap(IDS, replace(POLICY, rules=rules), number).apply()
        assert kernel.inc is not None
        send(sent)
    hits = {k: v[0] for k, v in kernel.rule_hits().items() if v[0]}
    assert hits == {"a": 3 + 7, "b": 2 + 5}, hits


def test_a_user_without_devices_added_or_regrouped_leaves_rule_changes_incremental(shared_program, tmp_path):
    """`user add`, or a group membership of a user with no device, changes the identities
    without a kernel step (no source changes). The next rule change stays incremental (not a
    whole compile: seconds at 10k rules) and right; a user whose devices' bits changed without
    their kernel step is still compiled whole."""
    from control.model import Identities, User

    kernel = kernel_on(shared_program, POLICY, IDS, tmp_path)
    number = shared_program.build
    ids = Identities(IDS.users + (User("dan@example.com", ("dev",)),), IDS.devices)
    dan = Rule("dan-ssh", 7, "allow", principals=(Principal("user", "dan@example.com"),),
               protocols=frozenset({"tcp"}), dst_ports=((2222, 2222),))
    policy = POLICY
    for ids, rules in [(ids, POLICY.rules + (dan,)),
                       (ids.replacing_user(ids.users[-1], replace(ids.users[-1], groups=())), POLICY.rules)]:
        number += 1
        policy = replace(POLICY, rules=rules)
        kernel.stage_swap(ids, policy, number).apply()
        assert kernel.build.tables.basis is None        # no compile
        pkts = probes(ids, ports=(22, 2222, 8080))
        assert kernel_verdicts(shared_program, kernel.build.tables, pkts) == reference_verdicts(policy, ids, pkts)
    # bob joins dev with no kernel step for his phone: the rule change compiles everything
    bob = ids.users[1]
    ids = ids.replacing_user(bob, replace(bob, groups=("dev",)))
    number += 1
    kernel.stage_swap(ids, replace(policy, rules=POLICY.rules[1:]), number).apply()
    assert kernel.build.tables.basis is not None


def test_a_policy_read_again_with_one_rule_changed_is_a_change_of_one_rule(shared_program, tmp_path):
    """`policy apply` of the file in force with one rule changed: every rule is a new object
    (parsed again), but only one differs: incremental, however many rules the policy has."""
    many = tuple(Rule(f"m{i}", 100 + i, "allow", protocols=frozenset({"udp"}), dst_ports=((6000 + i, 6000 + i),))
                 for i in range(20))
    policy = replace(POLICY, rules=POLICY.rules + many)
    kernel = kernel_on(shared_program, policy, IDS, tmp_path)
    again = replace(policy, rules=tuple(replace(r) for r in policy.rules[:-1]) + (replace(many[-1], action="block"),))
    assert all(a is not b for a, b in zip(again.rules, policy.rules))
    kernel.stage_swap(IDS, again, shared_program.build + 1).apply()
    assert kernel.build.tables.basis is None        # no compile
    pkts = probes(ports=(22, 6000, 6019))
    assert kernel_verdicts(shared_program, kernel.build.tables, pkts) == reference_verdicts(again, IDS, pkts)
