"""A device or user change at scale: the gateway's carried-over lookups (control/lookups.py:
Identities.adding_device, replacing_device, removing_devices, adding_user, replacing_user)
equal those worked out afresh after any sequence of changes, the checks that use them say what
they said before, and Sources.entries' who-bits for the changed
devices equal the plain definition (every who-token whose principals and source prefixes hold)
on a random deployment."""
import ipaddress
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from control.compiler import compile_policy
from control.model import Device, Identities, Policy, Principal, Rule, User

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
    carried = ids.__dict__["_lk"]
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
        assert ids.__dict__["_lk"] is carried and carried.serves(ids.users, ids.devices)   # handed on, not redone
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


def assert_lookups_fresh(ids: Identities, start: int, stop: int) -> None:
    """Every lookup IDS answers from what it was handed equals the same worked out afresh,
    and the plain definitions (a pass over every user and device)."""
    carried, new = ids.__dict__["_lk"], fresh(ids)
    new.work_out_lookups()
    assert carried.serves(ids.users, ids.devices)
    for part in ("users", "user_at", "devices", "device_at", "owned", "keys", "v4"):
        assert getattr(carried, part) == getattr(new.__dict__["_lk"], part), part
    used = {int(d.tunnel_ipv4) for d in ids.devices}
    assert ids.first_free_ipv4(start, stop) == next((a for a in range(start, stop) if a not in used), None)
    user = ids.users[-1]
    assert ids.devices_of(user.key) == [d for d in ids.devices if d.user == user.key]
    assert ids.find_device(ids.devices[-1].name) is ids.devices[-1] and ids.find_device("no-such") is None


def test_lookups_after_sequences_of_changes(deployment):
    """Adds, removals, enables and disables, renames (a device replaced by one of another name:
    not handed on, worked out afresh), key and group changes, new users, in random order: the
    lookups handed on stay equal to fresh ones, and the identities equal the plain edits."""
    rng = random.Random(3)
    ids = deployment.identities
    start = int(benchgen.TUNNEL4)
    stop = start + len(ids.devices) + 40
    ids.work_out_lookups()
    ids.first_free_ipv4(start, stop)
    plain_users, plain_devices = list(ids.users), list(ids.devices)
    for step in range(300):
        kind = rng.choice(("add", "add", "remove", "toggle", "rename", "rekey", "groups", "user"))
        if kind == "add":
            address = ids.first_free_ipv4(start, stop) if rng.random() < 0.7 else None
            address = address if address is not None else stop + step
            d = Device(f"seq-{step}", rng.choice(ids.users).key, ipaddress.IPv4Address(address),
                       None, f"key-{step}" if step % 3 else None, True)
            ids = ids.adding_device(d)
            plain_devices.append(d)
        elif kind == "remove":
            gone = {d.name for d in rng.sample(ids.devices, rng.randrange(1, 4))}
            ids = ids.removing_devices(gone)
            plain_devices = [d for d in plain_devices if d.name not in gone]
        elif kind in ("toggle", "rename", "rekey"):
            keyed = [d for d in ids.devices[-200:] if d.public_key]   # (benchgen's devices have no key)
            old = rng.choice(keyed if keyed and rng.random() < 0.5 else ids.devices)
            new = (replace(old, enabled=not old.enabled) if kind == "toggle" else
                   replace(old, name=f"renamed-{step}") if kind == "rename" else
                   replace(old, public_key=rng.choice([None, f"rekey-{step}", ids.devices[0].public_key])))
            ids = ids.replacing_device(old, new)
            plain_devices = [new if d is old else d for d in plain_devices]
        elif kind == "groups":
            old = rng.choice(ids.users)
            new = replace(old, groups=tuple(rng.sample(["g1", "g2", "g3", "new"], rng.randrange(3))))
            ids = ids.replacing_user(old, new)
            plain_users = [new if u is old else u for u in plain_users]
        else:
            u = User(f"Seq-{step}@Example.com", ("g1",))
            ids = ids.adding_user(u)
            plain_users.append(u)
        assert ids.users == tuple(plain_users) and ids.devices == tuple(plain_devices)
        if step % 15 == 0 or kind == "rename":
            if "_lk" not in ids.__dict__:       # (a rename is not handed on: worked out afresh)
                ids.work_out_lookups()
            assert_lookups_fresh(ids, start, stop)
    assert_lookups_fresh(ids, start, stop)


def test_device_errors_unchanged(tmp_path):
    """The device verbs' refusals, as they were before the lookups (the same words and exit
    status), made by a gateway that is not started: each is refused before the kernel or
    WireGuard is touched."""
    from control.config import parse_config
    from control.errors import InputError, ZtError
    from control.gateway import Gateway
    from control.wireguard import generate_keypair

    config = parse_config({"state_dir": str(tmp_path), "socket": str(tmp_path / "s.sock"),
                           "bpf_pin_dir": str(tmp_path / "pins"), "endpoint": "198.18.0.1:51820",
                           "pool_ipv4": "100.96.0.0/30", "pool_ipv6": None, "metrics": None,
                           "flow_log": str(tmp_path / "flows.log")})
    gw = Gateway(config)
    key = generate_keypair()[1]
    with gw.store.change(0, "test", {}) as tx:
        tx.add_user("a@example.com")
        tx.add_device(Device("laptop", "a@example.com", ipaddress.IPv4Address("100.96.0.2"), None, key, True))
        tx.add_device(Device("phone", "a@example.com", ipaddress.IPv4Address("100.96.0.3"), None, None, True))
    gw.state = gw._stored()
    gw.public_key = generate_keypair()[1]
    gw._warm_lookups()
    cases = [
        (lambda: gw.device_add(0, "Bad Name", "a@example.com", None), InputError,
         "device name 'Bad Name' must match [a-z0-9][a-z0-9._-]{0,62}"),
        (lambda: gw.device_add(0, "laptop", "a@example.com", None), InputError,
         "device 'laptop' exists already (remove it first, or pick another name)"),
        (lambda: gw.device_add(0, "tablet", "nobody@example.com", None), InputError,
         "no user 'nobody@example.com' (see `ztgate user list`)"),
        (lambda: gw.device_add(0, "tablet", "A@example.com", key), InputError,
         "that public key is already enrolled: each device has its own key pair"),
        (lambda: gw.device_add(0, "tablet", "a@example.com", gw.public_key), InputError,
         "that public key is already enrolled: each device has its own key pair"),
        (lambda: gw.device_add(0, "tablet", "a@example.com", None), ZtError,
         "the tunnel pool 100.96.0.0/30 is full"),
        (lambda: gw.device_set_enabled(0, "tablet", False), InputError,
         "no device named 'tablet' (see `ztgate device list`)"),
        (lambda: gw.device_set_enabled(0, ["laptop"], False), InputError,
         "no device named ['laptop'] (see `ztgate device list`)"),
        (lambda: gw.device_remove(0, "tablet"), InputError, "no device named 'tablet' (see `ztgate device list`)"),
    ]
    generation = gw.store.generation()
    for call, kind, message in cases:
        with pytest.raises(kind) as caught:
            call()
        assert str(caught.value) == message and type(caught.value) is kind
        assert caught.value.exit_status == (2 if kind is InputError else 1)
    assert gw.store.generation() == generation and gw.identities.devices == gw._stored().identities.devices
    gw.store.close()
