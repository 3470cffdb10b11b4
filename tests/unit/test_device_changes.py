"""A device or user change at scale: the gateway's carried-over lookups (Identities.adding_device,
replacing_device, replacing_user) equal those worked out afresh, and Sources.entries' who-bits for the changed
devices equal the plain definition (every who-token whose principals and source prefixes hold)
on a random deployment."""
import ipaddress
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from control.compiler import compile_policy
from control.model import Device, Identities, Policy, Principal, Rule

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import benchgen  # noqa: E402


@pytest.fixture(scope="module")
def deployment():
    sizes = dict(benchgen.SIZES, test=dict(devices=2_000, users=1_000, groups=40, rules=300))
    saved, benchgen.SIZES = benchgen.SIZES, sizes
    try:
        dep = benchgen.build("test", random.Random("device-changes"))
    finally:
        benchgen.SIZES = saved
    # benchgen writes neither source prefixes nor local groups: add rules and groups that have them.
    rng = random.Random("device-changes extra")
    emails = [u.key for u in dep.identities.users]
    local = {f"local-{i}": tuple(rng.sample(emails, 50)) for i in range(5)}
    extra = []
    for i in range(40):
        principals = tuple(rng.sample([Principal("group", g) for g in local] + [Principal("group", "g1"),
                                      Principal("user", rng.choice(emails))], rng.randrange(3)))
        length = rng.randrange(13, 24)
        net = ipaddress.ip_network(f"{benchgen.TUNNEL4 + rng.randrange(1 << 14)}/{length}", strict=False)
        extra.append(Rule(name=f"src-{i}", precedence=10**7 + i, action=rng.choice(("allow", "block")),
                          principals=principals, src_cidrs=(net,) if i % 4 else None,
                          dst_cidrs=(ipaddress.ip_network(f"10.{i}.0.0/16"),)))
    dep.policy = Policy(dep.policy.default_action, dep.policy.rules + tuple(extra), {**dep.policy.groups, **local})
    return dep


def plain_bits(tokens, policy, ids: Identities, device: Device, addr) -> int:
    """The who-bits by their definition: a pass over every token."""
    user = ids.user(device.user)
    groups = set(user.all_groups) | {g for g, members in policy.groups.items() if user.key in members}
    held = {("user", user.key), ("device", device.name)} | {("group", g) for g in groups}
    bits = 0
    for t, (principals, src_cidrs) in enumerate(tokens, start=1):
        if principals and not any((p.kind, p.name) in held for p in principals):
            continue
        if src_cidrs is not None and not any(addr in net for net in src_cidrs):
            continue
        bits |= 1 << t
    return bits


def fresh(ids: Identities) -> Identities:
    return Identities(ids.users, ids.devices)


def test_carried_lookups_equal_fresh_ones(deployment):
    rng = random.Random(1)
    ids = deployment.identities
    start, stop = int(benchgen.TUNNEL4), int(benchgen.TUNNEL4) + len(ids.devices) + 30
    ids.find_user(ids.users[0].email), ids.first_free_ipv4(start, stop)   # worked out: the next ones carry them
    for i in range(40):
        old = rng.choice(ids.users)
        ids = ids.replacing_user(old, replace(old, groups=old.groups + (f"new-{rng.randrange(5)}",)))
        free = ids.first_free_ipv4(start, stop)
        used = fresh(ids).ipv4_in_use
        assert free == next((a for a in range(start, stop) if a not in used), None)
        # the first free address (as device add picks it), or one further on
        address = free if i % 2 or free is None else free + rng.randrange(1, 20)
        d = Device(f"new-dev-{rng.randrange(10**9)}", rng.choice(ids.users).key,
                   ipaddress.IPv4Address(address if address is not None else stop + i), None, None, True)
        ids = ids.adding_device(d)
        toggled = rng.choice(ids.devices)
        ids = ids.replacing_device(toggled, replace(toggled, enabled=not toggled.enabled))
        assert {"_ubk", "_v4", "_free"} <= set(ids.__dict__)
        assert ids._users_by_key == fresh(ids)._users_by_key
        assert ids.ipv4_in_use == fresh(ids).ipv4_in_use
    assert ids.first_free_ipv4(start, stop) is None   # the pool filled up along the way


def test_entries_bits_equal_the_plain_definition(deployment):
    rng = random.Random(2)
    policy, ids = deployment.policy, deployment.identities
    tables = compile_policy(policy, ids)
    sources, tokens = tables.sources, tables.basis[0].who_tokens.values
    groups = sorted({g for u in ids.users for g in u.all_groups} | set(policy.groups))
    assert any(src is not None for _, src in tokens) and any(p for p, _ in tokens)   # both kinds of condition
    seen = set()
    for i in range(60):
        user = ids.user(rng.choice(policy.groups["local-0"])) if i % 3 == 0 else rng.choice(ids.users)
        changed = replace(user, groups=tuple(rng.sample(groups, rng.randrange(4))))
        ids = ids.replacing_user(user, changed)
        devices = [d for d in ids.devices if d.user == user.key and d.enabled]
        new = Device(f"dev-{rng.randrange(10**9)}", user.key, benchgen.TUNNEL4 + 10**6 + rng.randrange(10**5),
                     None, None, True)
        ids = ids.adding_device(new)
        for addr, ident, _ in sources.entries(ids, devices + [new]):
            device = next(d for d in devices + [new] if addr in d.addresses)
            assert sources.idents.values[ident - 1] == plain_bits(tokens, policy, ids, device, addr)
            seen.add(ident)
    assert len(seen) > 10   # many different who-bits were checked, not one
