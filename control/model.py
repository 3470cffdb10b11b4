"""The identity and policy model: plain, immutable values shared by the reference and the compiler."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
PortRange = tuple[int, int]  # inclusive

from .protocols import ICMP, ICMPV6, PROTOCOL_NAMES, TCP, UDP  # noqa: F401 (imported from here too)


def fold(email: str) -> str:
    """An email as it compares: case-insensitively in ASCII only, as SQLite's NOCASE does
    (str.lower() folds Unicode too: KELVIN SIGN, U+212A, would become a k)."""
    return email.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class User:
    email: str                 # as written; compare with .key
    groups: tuple[str, ...]    # the gateway's groups (`ztgate user add --groups`, group member)
    # From the identity provider (IDENTITY.md): who the user is there, the groups its tokens
    # and SCIM name, and whether it may log in. A user made by hand has none of them.
    provider_groups: tuple[str, ...] = ()
    issuer: Optional[str] = None
    subject: Optional[str] = None
    active: bool = True
    scim_id: Optional[str] = None
    external_id: Optional[str] = None
    # Made by an operator (`ztgate user add`, an identities file), not by a login or SCIM: kept
    # after the user logs in through the IdP, so SCIM never takes it over (admission.py).
    # Not compared: where a user came from is not part of what it is.
    by_hand: bool = field(default=False, compare=False)

    @property
    def key(self) -> str:
        return fold(self.email)

    @property
    def all_groups(self) -> tuple[str, ...]:
        """The groups rules see: the gateway's and the identity provider's."""
        return tuple(dict.fromkeys(self.groups + self.provider_groups))


@dataclass(frozen=True)
class Device:
    name: str
    user: str                  # the owner's email, lower-cased
    tunnel_ipv4: ipaddress.IPv4Address
    tunnel_ipv6: Optional[ipaddress.IPv6Address] = None
    public_key: Optional[str] = None
    enabled: bool = True
    session_expires: Optional[float] = None   # unix seconds; None: enrolled by hand, never expires

    def session_over(self, now: float) -> bool:
        return self.session_expires is not None and self.session_expires <= now

    @property
    def addresses(self) -> tuple[Address, ...]:
        return (self.tunnel_ipv4,) + ((self.tunnel_ipv6,) if self.tunnel_ipv6 else ())


@dataclass(frozen=True)
class Identities:
    users: tuple[User, ...]
    devices: tuple[Device, ...]

    def user(self, email: str) -> User:
        return self._users_by_key[fold(email)]

    def find_user(self, email: str) -> Optional[User]:
        """The user with this email (compared case-insensitively), or None."""
        return self._users_by_key.get(fold(email))

    def session_expired(self, device: Device, now: float) -> bool:
        """An enabled device whose packets drop as session-expired at NOW: its session is
        over, or its user was deprovisioned (inactive)."""
        user = self._users_by_key.get(device.user)
        return device.session_over(now) or (user is not None and not user.active)

    @property
    def _users_by_key(self) -> dict[str, User]:
        cached = self.__dict__.get("_ubk")
        if cached is None:
            cached = {u.key: u for u in self.users}
            object.__setattr__(self, "_ubk", cached)
        return cached

    @property
    def ipv4_in_use(self) -> frozenset[int]:
        """The devices' tunnel IPv4 addresses, as integers (where a new device may not go)."""
        cached = self.__dict__.get("_v4")
        if cached is None:
            cached = frozenset(int(d.tunnel_ipv4) for d in self.devices)
            object.__setattr__(self, "_v4", cached)
        return cached

    def first_free_ipv4(self, start: int, stop: int) -> Optional[int]:
        """The lowest IPv4 address (an integer) in [start, stop) that no device has, or None."""
        known = self.__dict__.get("_free", {})     # start -> an address below which all are in use
        used, address = self.ipv4_in_use, known.get(start, start)
        while address < stop and address in used:
            address += 1
        object.__setattr__(self, "_free", {**known, start: address})
        return address if address < stop else None

    # One change at 100k devices must not redo the lookups above over every user and device:
    # these two carry them over, updated, to the identities after the change.

    def adding_device(self, device: Device) -> "Identities":
        """These identities and DEVICE."""
        out = Identities(self.users, self.devices + (device,))
        if "_ubk" in self.__dict__:
            object.__setattr__(out, "_ubk", self._users_by_key)
        if "_v4" in self.__dict__:
            object.__setattr__(out, "_v4", self.ipv4_in_use | {int(device.tunnel_ipv4)})
        if "_free" in self.__dict__:   # an address more in use: what was all in use still is
            object.__setattr__(out, "_free", self._free)
        return out

    def replacing_device(self, old: Device, new: Device) -> "Identities":
        """These identities with device OLD (one of self.devices) replaced by NEW, which has
        the same addresses (enabled or not: a disabled device keeps its addresses)."""
        out = Identities(self.users, tuple(new if d is old else d for d in self.devices))
        same = new.tunnel_ipv4 == old.tunnel_ipv4
        for name in ("_ubk",) + (("_v4", "_free") if same else ()):
            if name in self.__dict__:
                object.__setattr__(out, name, self.__dict__[name])
        return out

    def replacing_user(self, old: User, new: User) -> "Identities":
        """These identities with user OLD (one of self.users) replaced by NEW (the same key)."""
        out = Identities(tuple(new if u is old else u for u in self.users), self.devices)
        if "_ubk" in self.__dict__:
            object.__setattr__(out, "_ubk", {**self._users_by_key, new.key: new})
        for name in ("_v4", "_free"):   # the same devices
            if name in self.__dict__:
                object.__setattr__(out, name, self.__dict__[name])
        return out


@dataclass(frozen=True)
class Principal:
    kind: str   # "user" | "group" | "device"
    name: str   # emails lower-cased

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Rule:
    """One rule. None means the condition is absent (holds); an empty tuple matches nothing."""

    name: str
    precedence: int
    action: str                                   # "allow" | "block"
    enabled: bool = True
    principals: tuple[Principal, ...] = ()        # empty: every identity
    protocols: Optional[frozenset[str]] = None    # subset of PROTOCOL_NAMES
    src_cidrs: Optional[tuple[Network, ...]] = None
    src_ports: Optional[tuple[PortRange, ...]] = None
    dst_cidrs: Optional[tuple[Network, ...]] = None
    dst_except: Optional[tuple[Network, ...]] = None
    dst_ports: Optional[tuple[PortRange, ...]] = None
    dst_hostnames: Optional[tuple[str, ...]] = None   # normalized (control/learned.py); "*.d": below d

    @property
    def states_ports(self) -> bool:
        return self.src_ports is not None or self.dst_ports is not None


@dataclass(frozen=True)
class Policy:
    default_action: str                           # "allow" | "block"
    rules: tuple[Rule, ...]                       # as written
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # local group -> emails (lower)

    @property
    def ordered_rules(self) -> list[Rule]:
        """The rules the evaluator tries, in the order it tries them."""
        return sorted((r for r in self.rules if r.enabled), key=lambda r: r.precedence)

    def groups_of(self, user: User) -> frozenset[str]:
        """Identity-provider groups plus every local group that lists the user."""
        local = {g for g, members in self.groups.items() if user.key in members}
        return frozenset(user.all_groups) | local


@dataclass(frozen=True)
class Packet:
    """A packet reduced to the fields the policy reads. Ports are None unless TCP or UDP."""

    src: Address
    dst: Address
    proto: int
    sport: Optional[int] = None
    dport: Optional[int] = None

    @property
    def protocol_name(self) -> str:
        """tcp, udp, icmp (ICMP on IPv4, ICMPv6 on IPv6) or 'other'."""
        if self.proto == TCP:
            return "tcp"
        if self.proto == UDP:
            return "udp"
        if self.proto == (ICMP if self.src.version == 4 else ICMPV6):
            return "icmp"
        return "other"


@dataclass(frozen=True)
class Decision:
    verdict: str                 # allow | block | unknown | malformed | fragment
    rule: Optional[str]
    reason: str                  # a dataplane.reasons.Reason name
    hostname: Optional[str] = None   # the learned name that put the destination in the rule's

    def as_json(self) -> dict:
        out = {"verdict": self.verdict, "rule": self.rule, "reason": self.reason}
        if self.hostname is not None:
            out["hostname"] = self.hostname
        return out


@dataclass(frozen=True)
class Connector:
    """A private network's way in: a WireGuard interface on the gateway (listening on
    listen_port) whose one peer is the connector inside that network, which dials out to it."""
    name: str
    interface: str
    listen_port: int
    private_key: str          # the gateway side's key (the store is 0600)
    public_key: str           # the connector's
    routes: tuple = ()        # the private prefixes routed to it (ipaddress networks)
