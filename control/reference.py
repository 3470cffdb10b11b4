"""The reference evaluator: spec/POLICY.md in code. Short and obviously right; slow on purpose.

Every kernel test compares the eBPF data plane against decide().
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from dataplane.reasons import Reason

from .model import Address, Decision, Device, Identities, Packet, Policy, Rule
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


def why_not(rule: Rule, who: Who, pkt: Packet) -> Optional[str]:
    """None when the rule matches the packet, else the first condition that fails, in words."""
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
    if rule.dst_cidrs is not None and not _in_any(pkt.dst, rule.dst_cidrs):
        return f"destination {pkt.dst} is not in {', '.join(map(str, rule.dst_cidrs)) or '(none)'}"
    if rule.dst_except is not None and _in_any(pkt.dst, rule.dst_except):
        return f"destination {pkt.dst} is in except {', '.join(map(str, rule.dst_except))}"
    for label, port, ranges in (("source", pkt.sport, rule.src_ports), ("destination", pkt.dport, rule.dst_ports)):
        if ranges is not None and not _port_in(port, ranges):
            items = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)
            return f"{label} port {port} is not in {items or '(none)'}"
    return None


def decide(policy: Policy, identities: Identities, probe: Probe) -> Decision:
    return trace(policy, identities, probe)[0]


def trace(policy: Policy, identities: Identities, probe: Probe):
    """The decision, and for each rule tried before the deciding one, why it did not match."""
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
        reason = why_not(rule, who, probe)
        if reason is None:
            return Decision(rule.action, rule.name, Reason.RULE.label), misses
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
