"""Synthetic deployments for scripts/bench, and the packets that exercise them.

Everything is drawn from one random.Random, so a seed names a deployment exactly. The shapes
follow the engine issue's bench (and /work/shared/CLASSIFIER-STUDY.md): the point is a
policy whose tables look like a real large one, not a worst case built to break the design.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from control.model import ICMP, ICMPV6, TCP, UDP, Device, Identities, Packet, Policy, Principal, Rule, User
from control.reference import decide

SIZES = {"small": dict(devices=10, users=5, groups=4, rules=10),
         "large": dict(devices=100_000, users=50_000, groups=500, rules=10_000),
         "medium": dict(devices=10_000, users=5_000, groups=50, rules=1_000)}   # the real-traffic leg's 1k
TUNNEL4 = ipaddress.IPv4Address("100.96.0.2")      # the pool is 100.96.0.0/12
TUNNEL6 = ipaddress.IPv6Address("fd00:5a::2")      # the pool is fd00:5a::/108
V4_SPACE = ipaddress.IPv4Network("10.0.0.0/8")     # where most destinations live
V4_OTHER = ipaddress.IPv4Network("172.16.0.0/12")  # a few elsewhere
V6_SPACE = ipaddress.IPv6Network("fd20::/32")
COMMON_PORTS = (22, 53, 80, 443, 445, 3306, 3389, 5432, 6379, 8080, 8443, 9090, 9200, 27017)
CLASSES = ("allowed", "blocked", "default", "unknown")


@dataclass
class Deployment:
    name: str
    policy: Policy
    identities: Identities
    members: dict[str, list[str]]        # group -> emails: to pick a device a rule names
    devices_of: dict[str, list[Device]]  # email -> enabled devices
    free4: int                           # first unassigned pool offset (unknown sources)


def build(name: str, rng: random.Random) -> Deployment:
    size = SIZES[name]
    groups = [f"g{i}" for i in range(size["groups"])]
    users = tuple(User(f"user{i}@example.com", tuple(rng.sample(groups, rng.randint(1, min(10, len(groups))))))
                  for i in range(size["users"]))
    devices = []
    for i in range(size["devices"]):
        # Every user has a device; the rest go to random users. 1 % are disabled, which is
        # where a realistic unknown source comes from (WireGuard's AllowedIPs stops the rest).
        owner = users[i] if i < len(users) else rng.choice(users)
        devices.append(Device(f"dev{i}", owner.key, TUNNEL4 + i, TUNNEL6 + i, enabled=rng.random() >= 0.01))
    members: dict[str, list[str]] = {g: [] for g in groups}
    for u in users:
        for g in u.groups:
            members[g].append(u.key)
    devices_of: dict[str, list[Device]] = {}
    for d in devices:
        if d.enabled:
            devices_of.setdefault(d.user, []).append(d)

    # Block rules first (lower precedence numbers, so above the allows they carve out of),
    # plus a sprinkle of blocks among the allows.
    n = size["rules"]
    n_block = max(1, n // 12)
    rules = tuple(_rule(rng, i, "block" if i < n_block or rng.random() < 0.02 else "allow", groups, users, devices)
                  for i in range(n))
    policy = Policy(default_action="block", rules=rules)
    return Deployment(name, policy, Identities(users, tuple(devices)), members, devices_of, len(devices))


def _rule(rng, i, action, groups, users, devices) -> Rule:
    principals = ()
    if rng.random() >= 0.03:   # 3 % name nobody: they apply to every identity
        picks = set()
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.80:
                picks.add(Principal("group", rng.choice(groups)))
            elif roll < 0.97:
                picks.add(Principal("user", rng.choice(users).key))
            else:
                picks.add(Principal("device", rng.choice(devices).name))
        principals = tuple(sorted(picks, key=str))
    cidrs = tuple(dict.fromkeys(_prefix(rng) for _ in range(rng.randint(1, 8))))
    protocols, ports, src_ports, except_ = None, _ports(rng), None, None
    roll = rng.random()
    if roll < 0.02:
        protocols, ports = frozenset({"icmp"}), None   # ports with icmp only is a validation error
    elif roll < 0.05:
        protocols = frozenset({"udp"})
    if rng.random() < 0.02 and cidrs[0].prefixlen < cidrs[0].max_prefixlen:
        except_ = (_subnet(rng, cidrs[0]),)
    if rng.random() < 0.02 and ports:
        src_ports = ((1024, 65535),)
    return Rule(name=f"r{i}", precedence=10 * (i + 1), action=action, principals=principals,
                protocols=protocols, src_ports=src_ports, dst_cidrs=cidrs, dst_except=except_, dst_ports=ports)


def _prefix(rng):
    if rng.random() < 0.10:
        return _subnet(rng, V6_SPACE, rng.randint(48, 128))
    return _subnet(rng, V4_SPACE if rng.random() < 0.95 else V4_OTHER, rng.randint(16, 32))


def _subnet(rng, net, length=None):
    """A random prefix of `length` (default: 1-8 bits longer) inside `net`."""
    length = length or min(net.max_prefixlen, net.prefixlen + rng.randint(1, 8))
    host_bits = net.max_prefixlen - length
    addr = int(net.network_address) + (rng.getrandbits(length - net.prefixlen) << host_bits)
    return ipaddress.ip_network((addr, length))


def _ports(rng):
    items = set()
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.7:
            p = rng.choice(COMMON_PORTS) if rng.random() < 0.5 else rng.randint(1, 65535)
            items.add((p, p))
        else:
            lo = rng.randint(1024, 60000)
            items.add((lo, lo + rng.randint(1, 2000)))
    return tuple(sorted(items))


# ---------------------------------------------------------------------------------------------
# Packets: candidates aimed at the rules' own destinations and ports, classed by the reference.

def classify(verdict: str, rule) -> str:
    if verdict == "unknown":
        return "unknown"
    if rule is None:
        return "default"
    return "allowed" if verdict == "allow" else "blocked"


def choose_packets(dep: Deployment, rng: random.Random, per_class: int, max_tries: int = 400):
    """{class: [(Packet, reference decision as JSON)]}, per_class each, all decided by decide()."""
    out = {c: [] for c in CLASSES}
    seen = set()
    rules = [r for r in dep.policy.rules if r.enabled]
    for want in CLASSES:
        tries = 0
        while len(out[want]) < per_class:
            tries += 1
            if tries > max_tries:
                raise SystemExit(f"bench: {dep.name}: found only {len(out[want])} {want} packets "
                                 f"in {max_tries} candidates; the generator no longer fits the policy")
            pkt = _candidate(dep, rng, want, rules)
            if pkt is None or pkt in seen:
                continue
            seen.add(pkt)
            d = decide(dep.policy, dep.identities, pkt).as_json()
            got = classify(d["verdict"], d["rule"])
            if len(out[got]) < per_class:   # a candidate that lands elsewhere still counts there
                out[got].append((pkt, d))
    return out


def _candidate(dep: Deployment, rng, want: str, rules):
    action = {"allowed": "allow", "blocked": "block"}.get(want)
    rule = rng.choice([r for r in rules if r.action == action] if action else rules)
    net = rng.choice(rule.dst_cidrs)
    dst = net.network_address + rng.randrange(net.num_addresses)
    if rule.dst_except and any(dst in e for e in rule.dst_except if e.version == dst.version):
        return None
    v6 = dst.version == 6
    if rule.protocols == frozenset({"icmp"}):
        proto, sport, dport = (ICMPV6 if v6 else ICMP), None, None
    else:
        proto = UDP if rule.protocols == frozenset({"udp"}) or rng.random() < 0.2 else TCP
        lo, hi = rng.choice(rule.dst_ports)
        # For "default", a port the rule does not list half the time: a miss after a walk.
        dport = rng.randint(1, 65535) if want == "default" and rng.random() < 0.5 else rng.randint(lo, hi)
        sport = rng.randint(1024, 65535)
    if want == "unknown":
        # A disabled device's address or an unassigned one in the pool: both inside the pool.
        disabled = [d for d in dep.identities.devices[:2000] if not d.enabled]
        if disabled and rng.random() < 0.5:
            dev = rng.choice(disabled)
            src = dev.tunnel_ipv6 if v6 else dev.tunnel_ipv4
        else:
            off = dep.free4 + rng.randrange(1000)
            src = TUNNEL6 + off if v6 else TUNNEL4 + off
        return Packet(src, dst, proto, sport, dport)
    dev = None
    if want != "default" and rule.principals:
        p = rng.choice(rule.principals)
        email = {"group": lambda: rng.choice(dep.members[p.name] or [None]),
                 "user": lambda: p.name}.get(p.kind, lambda: None)()
        if p.kind == "device":
            dev = next((d for d in dep.identities.devices if d.name == p.name and d.enabled), None)
        elif email and dep.devices_of.get(email):
            dev = rng.choice(dep.devices_of[email])
    if dev is None:
        dev = rng.choice(dep.identities.devices)
        if not dev.enabled:
            return None
    return Packet(dev.tunnel_ipv6 if v6 else dev.tunnel_ipv4, dst, proto, sport, dport)
