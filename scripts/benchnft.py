"""A ztgate policy as nftables, written as an engineer would write it by hand, for the bench's
real-traffic leg (scripts/benchtraffic.py): one table, a named set of device addresses per
principal (and one of every enabled device, for the identity check), and the rules one after
another in precedence order (rule-major), each expanded into one nft rule per principal and
address family. Same meaning as spec/POLICY.md for the packets the bench sends:

    ct state established,related accept          an engineer's first line
    ip saddr != @dev4 drop                        not an enabled device: unknown, dropped
    ip saddr @p7_4 ip daddr { ... } meta l4proto { tcp, udp } th dport { ... } accept
    ...
    policy drop                                   default_action
"""
from __future__ import annotations

import ipaddress

from control.model import Identities, Policy, Rule

FAMILY = {4: ("ip", "ipv4_addr", "icmp"), 6: ("ip6", "ipv6_addr", "ipv6-icmp")}
VERDICT = {"allow": "accept", "block": "drop"}


def ruleset(policy: Policy, identities: Identities, table: str = "ztbench", hook: str = "forward",
            dormant: bool = False) -> str:
    """The whole `nft -f` input: the table (recreated), its sets and its chain."""
    enabled = [d for d in identities.devices if d.enabled]
    holders = _holders(policy, identities, enabled)
    sets: dict[tuple[str, str], int] = {}         # (kind, name) -> set number
    lines = []
    for rule in policy.ordered_rules:
        for p in rule.principals:
            sets.setdefault((p.kind, p.name), len(sets))
        lines += _rule_lines(rule, sets)
    out = [f"table inet {table}", f"delete table inet {table}", f"table inet {table} {{"]
    if dormant:
        out.append("\tflags dormant")
    for version in (4, 6):
        out += _set(f"dev{version}", version, [d for d in enabled])
        for (kind, name), n in sets.items():
            out += _set(f"p{n}_{version}", version, holders.get((kind, name), []), f"{kind}:{name}")
    out += _chain_head(policy, hook)
    out += [f"\t\t{line}" for line in lines]
    out += ["\t}", "}"]
    return "\n".join(out) + "\n"


def _chain_head(policy: Policy, hook: str) -> list[str]:
    """The chain's opening: its hook and default, established flows, and unknown sources dropped."""
    return [f"\tchain {hook} {{",
            f"\t\ttype filter hook {hook} priority filter; policy {VERDICT[policy.default_action]};",
            "\t\tct state established,related accept",
            "\t\tip saddr != @dev4 drop", "\t\tip6 saddr != @dev6 drop"]


def _holders(policy: Policy, identities: Identities, enabled: list) -> dict[tuple[str, str], list]:
    """(kind, name) of every principal -> the enabled devices it holds for."""
    out: dict[tuple[str, str], list] = {}
    groups = {u.key: policy.groups_of(u) for u in identities.users}
    for d in enabled:
        out.setdefault(("device", d.name), []).append(d)
        out.setdefault(("user", d.user), []).append(d)
        for g in groups.get(d.user, ()):
            out.setdefault(("group", g), []).append(d)
    return out


def _set(name: str, version: int, devices: list, comment: str = "") -> list[str]:
    _, kind, _ = FAMILY[version]
    addrs = [str(a) for d in devices for a in d.addresses if a.version == version]
    out = [f"\tset {name} {{", f"\t\ttype {kind}"]
    if comment:
        out.append(f'\t\tcomment "{comment}"')
    if addrs:
        out.append(f"\t\telements = {{ {', '.join(addrs)} }}")
    return out + ["\t}"]


def _rule_lines(rule: Rule, sets: dict) -> list[str]:
    """One nft rule per principal (or one, without principals) and per family the rule's
    destinations allow; none when a condition can never hold."""
    if any(v == () for v in (rule.dst_cidrs, rule.src_cidrs, rule.dst_ports, rule.src_ports)):
        return []
    versions = [4, 6]
    if rule.dst_cidrs is not None:
        versions = [v for v in versions if any(n.version == v for n in rule.dst_cidrs)]
    if rule.src_cidrs is not None:
        versions = [v for v in versions if any(n.version == v for n in rule.src_cidrs)]
    out = []
    for version in versions:
        tail = _matches(rule, version)
        if tail is None:
            continue
        heads = [f"{FAMILY[version][0]} saddr @p{sets[(p.kind, p.name)]}_{version}" for p in rule.principals] or \
            ([f"meta nfproto ipv{version}"] if rule.dst_cidrs is None and rule.src_cidrs is None else [""])
        out += [" ".join(x for x in (head, tail, VERDICT[rule.action]) if x) for head in heads]
    return out


def _matches(rule: Rule, version: int):
    """The rule's conditions but its principals, for one family (None: it cannot match it)."""
    fam, _, icmp = FAMILY[version]
    parts = []
    for field, nets in (("saddr", rule.src_cidrs), ("daddr", rule.dst_cidrs)):
        if nets is not None:
            parts.append(f"{fam} {field} {_nets(nets, version)}")
    if rule.dst_except:
        excepted = [n for n in rule.dst_except if n.version == version]
        if excepted:
            parts.append(f"{fam} daddr != {_nets(excepted, version)}")
    protos = rule.protocols
    if rule.states_ports:
        protos = (protos or frozenset({"tcp", "udp"})) & {"tcp", "udp"}
        if not protos:
            return None
    if protos is not None:
        names = sorted(icmp if p == "icmp" else p for p in protos)
        parts.append(f"meta l4proto {{ {', '.join(names)} }}")
    for field, ports in (("sport", rule.src_ports), ("dport", rule.dst_ports)):
        if ports is not None:
            parts.append(f"th {field} {{ {', '.join(_port_items(ports))} }}")
    return " ".join(parts)


def _nets(nets, version: int) -> str:
    """A set of prefixes, merged (nft refuses overlapping intervals in one set)."""
    merged = ipaddress.collapse_addresses(n for n in nets if n.version == version)
    return "{ " + ", ".join(map(str, merged)) + " }"


def _port_items(ranges) -> list[str]:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in merged]


def increments(policy: Policy, identities: Identities, table: str = "ztbench", hook: str = "forward"):
    """The same table as ruleset() (not dormant), as `nft -f` inputs to load one after another:
    first the table, its chain and the sets of enabled devices, then one input per rule in
    precedence order: the sets of principals it is the first to name, and its nft rules. A
    prefix of them is the policy's first rules (scripts/benchnftchanges.py loads as many as nft
    takes in its time budget)."""
    enabled = [d for d in identities.devices if d.enabled]
    holders = _holders(policy, identities, enabled)
    head = [f"table inet {table}", f"delete table inet {table}", f"table inet {table} {{"]
    for version in (4, 6):
        head += _set(f"dev{version}", version, enabled)
    head += _chain_head(policy, hook) + ["\t}", "}"]
    yield "\n".join(head) + "\n"
    sets: dict[tuple[str, str], int] = {}
    for rule in policy.ordered_rules:
        out = []
        for p in rule.principals:
            if (p.kind, p.name) not in sets:
                sets[(p.kind, p.name)] = len(sets)
                for version in (4, 6):
                    body = _set(f"p{sets[(p.kind, p.name)]}_{version}", version, holders.get((p.kind, p.name), []),
                                f"{p.kind}:{p.name}")
                    out += [f"add set inet {table} " + body[0].strip().removeprefix("set ")] + body[1:]
        out += [f"add rule inet {table} {hook} {line}" for line in _rule_lines(rule, sets)]
        yield "\n".join(out) + "\n"
