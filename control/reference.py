"""The reference evaluator: spec/POLICY.md in code. Short and obviously right; slow on purpose.

Every kernel test compares the eBPF data plane against decide().
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from dataplane.reasons import Reason

from .learned import matches
from .model import Address, Decision, Device, Identities, Packet, Policy, Rule

Learned = dict   # address -> frozenset of the names it was learned for (control/learned.py)
from .packets import FragmentPart, Probe, Unreadable, parse_raw


@dataclass(frozen=True)
class Who:
    """The identity a packet carries once its source is known."""

    device: Device
    email: str
    groups: frozenset[str]


def identify(policy: Policy, identities: Identities, src: Address) -> Optional[Who]:
    for device in identities.devices:
        if device.enabled and src in device.addresses:
            user = identities.user(device.user)
            return Who(device, user.key, policy.groups_of(user))
    return None


def _in_any(addr: Address, nets) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def _port_in(port: Optional[int], ranges) -> bool:
    return port is not None and any(lo <= port <= hi for lo, hi in ranges)


def hostname_of(rule: Rule, dst: Address, learned: Optional[Learned]) -> Optional[str]:
    """The name that puts DST in RULE's destination by its hostnames (the first in order of the
    names DST was learned for that one of the rule's names matches), or None: DST lies in the
    rule's prefixes (they come first), or in no name of the rule."""
    if rule.dst_hostnames is None or (rule.dst_cidrs is not None and _in_any(dst, rule.dst_cidrs)):
        return None
    return next((n for n in sorted((learned or {}).get(dst, ()))
                 if any(matches(p, n) for p in rule.dst_hostnames)), None)


def _destination_miss(rule: Rule, dst: Address, learned: Optional[Learned]) -> Optional[str]:
    """None when DST lies in the rule's destination (cidrs and/or hostnames, minus except)."""
    cidrs = ", ".join(map(str, rule.dst_cidrs or ())) or "(none)"
    if rule.dst_hostnames is not None:
        if not (rule.dst_cidrs is not None and _in_any(dst, rule.dst_cidrs)) and \
                hostname_of(rule, dst, learned) is None:
            names = ", ".join(sorted((learned or {}).get(dst, ()))) or "no name"
            return f"destination {dst} is not in {cidrs if rule.dst_cidrs is not None else 'no prefix'} " \
                   f"and was learned for {names}, not for {', '.join(rule.dst_hostnames) or '(none)'}"
    elif rule.dst_cidrs is not None and not _in_any(dst, rule.dst_cidrs):
        return f"destination {dst} is not in {cidrs}"
    if rule.dst_except is not None and _in_any(dst, rule.dst_except):
        return f"destination {dst} is in except {', '.join(map(str, rule.dst_except))}"
    return None


def why_not(rule: Rule, who: Who, pkt: Packet, learned: Optional[Learned] = None) -> Optional[str]:
    """None when the rule matches the packet, else the first condition that fails, in words.
    LEARNED: the names each destination address was learned for (spec: Hostnames)."""
    if rule.principals and not any(
        (p.kind == "user" and p.name == who.email)
        or (p.kind == "group" and p.name in who.groups)
        or (p.kind == "device" and p.name == who.device.name)
        for p in rule.principals
    ):
        return f"principals {', '.join(map(str, rule.principals))} do not include " \
               f"device {who.device.name} of {who.email} (groups: {', '.join(sorted(who.groups)) or 'none'})"
    if rule.protocols is not None and pkt.protocol_name not in rule.protocols:
        return f"protocol {pkt.protocol_name} is not in {sorted(rule.protocols)}"
    if rule.states_ports and pkt.protocol_name not in ("tcp", "udp"):
        return f"the rule states ports and the packet is {pkt.protocol_name}, not tcp or udp"
    if rule.src_cidrs is not None and not _in_any(pkt.src, rule.src_cidrs):
        return f"source {pkt.src} is not in {', '.join(map(str, rule.src_cidrs)) or '(none)'}"
    miss = _destination_miss(rule, pkt.dst, learned)
    if miss:
        return miss
    for label, port, ranges in (("source", pkt.sport, rule.src_ports), ("destination", pkt.dport, rule.dst_ports)):
        if ranges is not None and not _port_in(port, ranges):
            items = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)
            return f"{label} port {port} is not in {items or '(none)'}"
    return None


def decide(policy: Policy, identities: Identities, probe: Probe, learned: Optional[Learned] = None) -> Decision:
    return trace(policy, identities, probe, learned)[0]


def trace(policy: Policy, identities: Identities, probe: Probe, learned: Optional[Learned] = None):
    """The decision, and for each rule tried before the deciding one, why it did not match.
    A rule that matched by a learned name names it in the decision's hostname."""
    if isinstance(probe, bytes):
        try:
            probe = parse_raw(probe)
        except Unreadable as e:
            return Decision(e.verdict, None, e.reason.label), []
    who = identify(policy, identities, probe.src)
    if who is None:
        return Decision("unknown", None, Reason.UNKNOWN_SOURCE.label), []
    if identities.session_expired(who.device, time.time()):
        return Decision("block", None, Reason.SESSION_EXPIRED.label), []
    misses = []
    for rule in policy.ordered_rules:
        reason = why_not(rule, who, probe, learned)
        if reason is None:
            return Decision(rule.action, rule.name, Reason.RULE.label, hostname_of(rule, probe.dst, learned)), misses
        misses.append((rule, reason))
    return Decision(policy.default_action, None, Reason.DEFAULT.label), misses


def later_fragment(first: FragmentPart, allowed: bool, later: FragmentPart) -> Optional[Reason]:
    """What a running gateway does with a later fragment after the first fragment of a datagram
    went by (POLICY.md, fragments): it follows an allowed first of its datagram (the same
    addresses, identification and named protocol), unless it would overwrite the headers the
    first carried; None: it stays dropped as a fragment."""
    if not allowed or not first.more or first.offset or later.datagram != first.datagram:
        return None
    return Reason.FRAGMENT_OVERLAP if later.offset < first.headers_end else Reason.FRAGMENT_FOLLOWS
