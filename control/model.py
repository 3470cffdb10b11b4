"""The identity and policy model: plain, immutable values shared by the reference and the compiler."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
PortRange = tuple[int, int]  # inclusive

from .lookups import Lookups  # noqa: E402
from .protocols import ICMP, ICMPV6, PROTOCOL_NAMES, TCP, UDP  # noqa: F401,E402 (imported from here too)


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
        return self._lookups.users[fold(email)]

    def find_user(self, email: str) -> Optional[User]:
        """The user with this email (compared case-insensitively), or None."""
        return self._lookups.users.get(fold(email))

    def find_device(self, name: str) -> Optional[Device]:
        """The device of this name, or None."""
        return self._lookups.devices.get(name)

    def key_enrolled(self, public_key: str) -> bool:
        """Does a device have this public key?"""
        return public_key in self._lookups.keys

    def devices_of(self, key: str) -> list[Device]:
        """The devices of the user with this key (User.key), enabled or not, in their order."""
        lookups = self._lookups
        return [lookups.devices[name] for name in lookups.owned.get(key, ())]

    def session_expired(self, device: Device, now: float) -> bool:
        """An enabled device whose packets drop as session-expired at NOW: its session is
        over, or its user was deprovisioned (inactive)."""
        user = self._lookups.users.get(device.user)
        return device.session_over(now) or (user is not None and not user.active)

    @property
    def _users_by_key(self) -> dict[str, User]:
        return self._lookups.users

    @property
    def ipv4_in_use(self) -> frozenset[int]:
        """The devices' tunnel IPv4 addresses, as integers (where a new device may not go)."""
        return frozenset(self._lookups.v4)

    def first_free_ipv4(self, start: int, stop: int) -> Optional[int]:
        """The lowest IPv4 address (an integer) in [start, stop) that no device has, or None."""
        lookups = self._lookups
        used, address = lookups.v4, lookups.free.get(start, start)
        while address < stop and address in used:
            address += 1
        lookups.free[start] = address
        return address if address < stop else None

    def work_out_lookups(self) -> None:
        """Every lookup above, now: see control/lookups.py."""
        self._lookups.work_out()

    @property
    def _lookups(self) -> Lookups:
        """Users by key, devices by name and the like (control/lookups.py): handed on from the
        identities this one was made from by one change, or worked out here."""
        lookups = self.__dict__.get("_lk")
        if lookups is None or not lookups.serves(self.users, self.devices):
            lookups = Lookups(self.users, self.devices)
            object.__setattr__(self, "_lk", lookups)
        return lookups

    # One change at 100k devices must not redo the lookups above over every user and device,
    # nor pass over them to make its new identities: these hand them on, updated, to the
    # identities after the change.

    def _handed_on(self, users: tuple, devices: tuple) -> tuple["Identities", Optional[Lookups]]:
        """New identities of USERS and DEVICES, and the lookups to update for them (None if
        this one had none worked out: the new one works out its own when asked)."""
        out = Identities(users, devices)
        lookups = self.__dict__.get("_lk")
        if lookups is None or not lookups.serves(self.users, self.devices):
            return out, None
        object.__setattr__(out, "_lk", lookups.handed_on(users, devices))
        return out, lookups

    def adding_device(self, device: Device) -> "Identities":
        """These identities and DEVICE."""
        out, lookups = self._handed_on(self.users, self.devices + (device,))
        if lookups is not None:
            lookups.device_added(device, len(self.devices))
        return out

    def replacing_device(self, old: Device, new: Device) -> "Identities":
        """These identities with device OLD (one of self.devices) replaced by NEW, of the same
        name (enabled or not: a disabled device keeps its addresses)."""
        lookups = self._lookups
        at = lookups.device_at.get(old.name) if len(lookups.devices) == len(self.devices) else None   # (names unique)
        if at is None or self.devices[at] is not old or new.name != old.name:
            return Identities(self.users, tuple(new if d is old else d for d in self.devices))
        out, lookups = self._handed_on(self.users, _replaced(self.devices, at, new))
        lookups.device_replaced(old, new)
        return out

    def removing_devices(self, names) -> "Identities":
        """These identities without the devices of these names."""
        lookups, names = self._lookups, set(names)
        gone = sorted((lookups.device_at[n], lookups.devices[n]) for n in names if n in lookups.devices)
        if len(lookups.devices) != len(self.devices) or len(gone) != len(names) or any(self.devices[at] is not d for at, d in gone):
            return Identities(self.users, tuple(d for d in self.devices if d.name not in names))
        devices, last = (), 0
        for at, _ in gone:
            devices, last = devices + self.devices[last:at], at + 1
        out, lookups = self._handed_on(self.users, devices + self.devices[last:])
        lookups.devices_removed([d for _, d in gone])
        return out

    def adding_user(self, user: User) -> "Identities":
        """These identities and USER (of a key no user has)."""
        out, lookups = self._handed_on(self.users + (user,), self.devices)
        if lookups is not None:
            lookups.user_added(user, len(self.users))
        return out

    def replacing_user(self, old: User, new: User) -> "Identities":
        """These identities with user OLD (one of self.users) replaced by NEW (the same key)."""
        lookups = self._lookups
        at = lookups.user_at.get(old.key) if len(lookups.users) == len(self.users) else None   # (keys unique)
        if at is None or self.users[at] is not old or new.key != old.key:
            return Identities(tuple(new if u is old else u for u in self.users), self.devices)
        out, lookups = self._handed_on(_replaced(self.users, at, new), self.devices)
        lookups.user_replaced(new)
        return out


def _replaced(items: tuple, at: int, new) -> tuple:
    """ITEMS with the one AT replaced by NEW: through a list, which touches each of 100k items
    (their reference counts: a cache miss each) three times, where slicing and joining touch
    them five."""
    out = list(items)
    out[at] = new
    return tuple(out)


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
