"""Load and validate identities.yaml and policy.yaml exactly as spec/POLICY.md says.

Every refusal raises InputError naming the file, the entry (rule by name or index) and the
field. A file is refused as a whole: nothing is returned for a file with any error.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from operator import attrgetter
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError
from .learned import hostname_problem, normalize
from .keytext import check_public_key
from .yamlfile import read_yaml
from .model import Device, Identities, Policy, Principal, Rule, User, PROTOCOL_NAMES, fold

RULE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
DEVICE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
ACTIONS = ("allow", "block")


class _Where:
    """Builds messages of the form 'FILE: rules[2] (ssh): destination.ports: what is wrong'."""

    def __init__(self, file: str, entry: str = ""):
        self.file, self.entry = file, entry

    def at(self, entry: str) -> "_Where":
        return _Where(self.file, entry)

    def error(self, field: str, what: str) -> InputError:
        parts = [self.file] + [p for p in (self.entry, field) if p]
        return InputError(": ".join(parts) + ": " + what)


def _mapping(where: _Where, field: str, value: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise where.error(field, f"must be a mapping, got {type(value).__name__}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise where.error(field, f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    return value


def _list(where: _Where, field: str, value: Any) -> list:
    if not isinstance(value, list):
        raise where.error(field, f"must be a list, got {type(value).__name__}")
    return value


def _string(where: _Where, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(field, f"must be a non-empty string, got {value!r}")
    bad = unprintable(value)
    if bad:
        raise where.error(field, f"{value!r} holds the control character {bad!r}: names, emails and groups are "
                                 "printed to operators' terminals, so they must be plain text")
    return value


def unprintable(text: str) -> str:
    """The first control or formatting character of TEXT (escapes, bidirectional overrides),
    or "": such a character in a name would act on the terminal of whoever lists it."""
    if text.isprintable():      # (no Cc or Cf in it: the usual case, without a pass in Python)
        return ""
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Cf")), "")


def _bool(where: _Where, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise where.error(field, f"must be true or false, got {value!r}")
    return value


def _address(where: _Where, field: str, value: Any, version: int):
    if isinstance(value, str) and value.isprintable():
        try:            # the usual case: the address of the version asked for (one parse, not two)
            return (ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address)(value)
        except ValueError:
            pass        # refused below, in the words of the general case
    try:
        addr = ipaddress.ip_address(_string(where, field, value))
    except ValueError:
        raise where.error(field, f"{value!r} is not an IP address") from None
    if addr.version != version:
        raise where.error(field, f"{value!r} is not an IPv{version} address")
    return addr


def _prefixes(where: _Where, field: str, value: Any) -> tuple:
    out = []
    for item in _list(where, field, value):
        text = str(item) if isinstance(item, (str, int)) and not isinstance(item, bool) else None
        if text is None:
            raise where.error(field, f"{item!r} is not a prefix")
        try:
            out.append(ipaddress.ip_network(text, strict=True))
        except ValueError as e:
            if "has host bits set" in str(e):
                net = ipaddress.ip_network(text, strict=False)
                raise where.error(field, f"{text!r} has host bits set (did you mean {net}?)") from None
            raise where.error(field, f"{text!r} is not a valid IPv4 or IPv6 prefix") from None
    return tuple(out)


def _ports(where: _Where, field: str, value: Any) -> tuple:
    out = []
    for item in _list(where, field, value):
        if isinstance(item, bool):
            raise where.error(field, f"{item!r} is not a port or range")
        if isinstance(item, int):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*(-\s*\d+\s*)?", item):
            lo, _, hi = item.partition("-")
            lo, hi = int(lo), int(hi) if hi else int(lo)
        else:
            raise where.error(field, f"{item!r} is not a port or an inclusive range 'a-b'")
        for p in (lo, hi):
            if not 0 <= p <= 65535:
                raise where.error(field, f"port {p} in {item!r} is outside 0-65535")
        if lo > hi:
            raise where.error(field, f"range {item!r} starts after it ends")
        out.append((lo, hi))
    return tuple(out)


def _hostnames(where: _Where, field: str, value: Any) -> tuple:
    """DNS names and `*.` wildcards (spec/POLICY.md, Hostnames), kept as they compare: in lower
    case, without a trailing dot."""
    out = []
    for item in _list(where, field, value):
        if not isinstance(item, str) or not item:
            raise where.error(field, f"{item!r} is not a DNS name")
        problem = hostname_problem(item)
        if problem:
            raise where.error(field, f"{item!r} {problem}")
        out.append(normalize(item))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# identities.yaml

def load_identities(path: str | Path) -> Identities:
    return parse_identities(read_yaml(path), str(path))


def parse_identities(doc: Any, file: str = "identities") -> Identities:
    where = _Where(file)
    doc = _mapping(where, "", {} if doc is None else doc, ("users", "devices"))
    users: list[User] = []
    emails: set[str] = set()
    for i, raw in enumerate(_list(where, "users", doc.get("users") or [])):
        w = where.at(f"users[{i}]")
        raw = _mapping(w, "", raw, ("email", "groups"))
        email = _string(w, "email", raw.get("email"))
        if "@" not in email:
            raise w.error("email", f"{email!r} is not an email address")
        if not email.isascii():     # emails compare by lower(), which folds Unicode too (K, U+212A: k)
            raise w.error("email", f"{email!r}: only ASCII email addresses are accepted "
                                   "(an internationalised domain in its xn-- form): use the user's ASCII "
                                   "address or alias, as the identity provider's tokens name it")
        if fold(email) in emails:
            raise w.error("email", f"duplicate email {email!r} (emails compare case-insensitively)")
        emails.add(fold(email))
        groups = tuple(_string(w, "groups", g) for g in _list(w, "groups", raw.get("groups") or []))
        users.append(User(email=email, groups=groups, by_hand=True))

    devices: list[Device] = []
    names: set[str] = set()
    addresses: dict = {}
    keys: dict[str, str] = {}
    for i, raw in enumerate(_list(where, "devices", doc.get("devices") or [])):
        w = where.at(f"devices[{i}]")
        raw = _mapping(w, "", raw, ("name", "user", "tunnel_ipv4", "tunnel_ipv6", "public_key", "enabled"))
        name = _string(w, "name", raw.get("name"))
        w = where.at(f"devices[{i}] ({name})")
        if not DEVICE_NAME.match(name):
            raise w.error("name", f"{name!r} must match [a-z0-9][a-z0-9._-]{{0,62}}")
        if name in names:
            raise w.error("name", f"duplicate device name {name!r}")
        names.add(name)
        owner = fold(_string(w, "user", raw.get("user")))
        if owner not in emails:
            raise w.error("user", f"{raw['user']!r} is not a user in this file")
        if raw.get("tunnel_ipv4") is None:
            raise w.error("tunnel_ipv4", "is required")
        v4 = _address(w, "tunnel_ipv4", raw["tunnel_ipv4"], 4)
        v6 = _address(w, "tunnel_ipv6", raw["tunnel_ipv6"], 6) if raw.get("tunnel_ipv6") is not None else None
        for field, addr in (("tunnel_ipv4", v4), ("tunnel_ipv6", v6)):
            if addr is None:
                continue
            if addr in addresses:
                raise w.error(field, f"duplicate tunnel address {addr} (also device {addresses[addr]!r})")
            addresses[addr] = name
        key = raw.get("public_key")
        if key is not None:
            try:
                check_public_key(_string(w, "public_key", key))
            except InputError as e:
                raise w.error("public_key", str(e)) from None
            if key in keys:
                raise w.error("public_key", f"the key of device {keys[key]!r} too: each device has a key of its own")
            keys[key] = name
        enabled = _bool(w, "enabled", raw.get("enabled", True))
        devices.append(Device(name, owner, v4, v6, key, enabled))
    return Identities(tuple(users), tuple(devices))


# ---------------------------------------------------------------------------------------------
# policy.yaml

def load_policy(path: str | Path) -> Policy:
    return parse_policy(read_yaml(path), str(path))


def parse_policy(doc: Any, file: str = "policy") -> Policy:
    where = _Where(file)
    doc = _mapping(where, "", {} if doc is None else doc, ("version", "default_action", "groups", "rules"))
    if doc.get("version", 1) != 1:
        raise where.error("version", f"unsupported version {doc['version']!r} (this ztgate reads version 1)")
    default = doc.get("default_action", "block")
    if default not in ACTIONS:
        raise where.error("default_action", f"unknown action {default!r} (use allow or block)")

    raw_groups = doc.get("groups") or {}
    if not isinstance(raw_groups, dict):
        raise where.error("groups", "must be a mapping of group name to a list of emails")
    groups: dict[str, tuple[str, ...]] = {}
    for g, members in raw_groups.items():
        gname = _string(where, "groups", g)
        groups[gname] = tuple(fold(_string(where, f"groups.{gname}", m))
                              for m in _list(where, f"groups.{gname}", members or []))

    rules: list[Rule] = []
    seen: tuple[dict, dict] = ({}, {})
    for i, raw in enumerate(_list(where, "rules", doc.get("rules") or [])):
        rule = _parse_rule(where, i, raw)
        _check_unique(where, i, rule, seen)
        rules.append(rule)
    return Policy(default_action=default, rules=tuple(rules), groups=groups)


def check_rules(rules: Iterable[Rule], file: str = "rules") -> None:
    """A policy's rule list, each rule already valid on its own (parse_rule): no name and no
    precedence twice. Refused as parse_policy() refuses the same list in a file."""
    rules = list(rules)
    if len(set(map(attrgetter("name"), rules))) == len(set(map(attrgetter("precedence"), rules))) == len(rules):
        return     # (the usual case, at C speed: a rule change checks 10,000 rules at the bench's large scale)
    seen: tuple[dict, dict] = ({}, {})
    where = _Where(file)
    for i, rule in enumerate(rules):
        _check_unique(where, i, rule, seen)


def _check_unique(where: _Where, i: int, rule: Rule, seen: tuple[dict, dict]) -> None:
    names, precedences = seen
    w = where.at(f"rules[{i}] ({rule.name})")
    if rule.name in names:
        raise w.error("name", f"duplicate rule name (also rules[{names[rule.name]}])")
    if rule.precedence in precedences:
        raise w.error("precedence", f"duplicate precedence {rule.precedence} (also rule {precedences[rule.precedence]!r})")
    names[rule.name], precedences[rule.precedence] = i, rule.name


RULE_KEYS = ("name", "precedence", "action", "enabled", "principals", "protocols", "source", "destination")


def parse_rule(raw: Any, source: str = "rule") -> Rule:
    """One rule on its own (`ztgate rule add`), checked exactly as in a policy file."""
    return _parse_rule(_Where(source), None, raw)


def _parse_rule(where: _Where, i: int | None, raw: Any) -> Rule:
    label = f"rules[{i}]" if i is not None else ""
    w = where.at(label)
    raw = _mapping(w, "", raw, RULE_KEYS)
    name = _string(w, "name", raw.get("name"))
    w = where.at(f"{label} ({name})") if label else _Where(f"{where.file} {name!r}")
    if not RULE_NAME.match(name):
        raise w.error("name", f"{name!r} must match [a-z0-9][a-z0-9-]{{0,62}}")
    prec = raw.get("precedence")
    if not isinstance(prec, int) or isinstance(prec, bool) or prec < 1:
        raise w.error("precedence", f"must be an integer >= 1, got {prec!r}")
    action = raw.get("action")
    if action not in ACTIONS:
        raise w.error("action", f"unknown action {action!r} (use allow or block)")
    enabled = _bool(w, "enabled", raw.get("enabled", True))

    principals = []
    for item in _list(w, "principals", raw.get("principals") or []):
        kind, sep, pname = item.partition(":") if isinstance(item, str) else ("", "", "")
        if not sep or kind not in ("user", "group", "device") or not pname:
            raise w.error("principals", f"{item!r} is not user:EMAIL, group:NAME or device:NAME")
        principals.append(Principal(kind, fold(pname) if kind == "user" else pname))

    protocols = None
    if raw.get("protocols") is not None:
        protocols = []
        for p in _list(w, "protocols", raw["protocols"]):
            if p not in PROTOCOL_NAMES:
                raise w.error("protocols", f"unknown protocol {p!r} (use tcp, udp or icmp)")
            protocols.append(p)
        protocols = frozenset(protocols)

    src = _mapping(w, "source", raw.get("source") or {}, ("cidrs", "ports"))
    dst = _mapping(w, "destination", raw.get("destination") or {}, ("cidrs", "except", "hostnames", "ports"))

    def opt(section: dict, key: str, label: str, parse):
        return parse(w, label, section[key]) if section.get(key) is not None else None

    rule = Rule(
        name=name, precedence=prec, action=action, enabled=enabled,
        principals=tuple(principals), protocols=protocols,
        src_cidrs=opt(src, "cidrs", "source.cidrs", _prefixes),
        src_ports=opt(src, "ports", "source.ports", _ports),
        dst_cidrs=opt(dst, "cidrs", "destination.cidrs", _prefixes),
        dst_except=opt(dst, "except", "destination.except", _prefixes),
        dst_ports=opt(dst, "ports", "destination.ports", _ports),
        dst_hostnames=opt(dst, "hostnames", "destination.hostnames", _hostnames),
    )
    if rule.states_ports and protocols is not None and not protocols & {"tcp", "udp"}:
        field = "destination.ports" if rule.dst_ports is not None else "source.ports"
        raise w.error(field, f"ports need tcp or udp, but protocols is {sorted(protocols)}: "
                             "add tcp/udp to protocols or remove the ports")
    return rule


# ---------------------------------------------------------------------------------------------
# back to the file format: what `ztgate policy show` prints and the store keeps

def _port_doc(ranges) -> list:
    return [lo if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]


def rule_doc(rule: Rule) -> dict:
    """A rule in the file format; parse_policy() reads it back to an equal Rule."""
    doc: dict = {"name": rule.name, "precedence": rule.precedence, "action": rule.action}
    if not rule.enabled:
        doc["enabled"] = False
    if rule.principals:
        doc["principals"] = [str(p) for p in rule.principals]
    if rule.protocols is not None:
        doc["protocols"] = [p for p in PROTOCOL_NAMES if p in rule.protocols]
    for section, pairs in (("source", (("cidrs", rule.src_cidrs), ("ports", rule.src_ports))),
                           ("destination", (("cidrs", rule.dst_cidrs), ("except", rule.dst_except),
                                            ("hostnames", rule.dst_hostnames), ("ports", rule.dst_ports)))):
        body = {k: (_port_doc(v) if k == "ports" else [str(n) for n in v]) for k, v in pairs if v is not None}
        if body:
            doc[section] = body
    return doc


def policy_doc(policy: Policy) -> dict:
    doc: dict = {"version": 1, "default_action": policy.default_action}
    if policy.groups:
        doc["groups"] = {g: list(members) for g, members in policy.groups.items()}
    doc["rules"] = [rule_doc(r) for r in sorted(policy.rules, key=lambda r: r.precedence)]
    return doc


def identities_doc(identities: Identities) -> dict:
    users = [{"email": u.email, **({"groups": list(u.groups)} if u.groups else {})} for u in identities.users]
    devices = []
    for d in identities.devices:
        dev = {"name": d.name, "user": d.user, "tunnel_ipv4": str(d.tunnel_ipv4)}
        if d.tunnel_ipv6:
            dev["tunnel_ipv6"] = str(d.tunnel_ipv6)
        if d.public_key:
            dev["public_key"] = d.public_key
        if not d.enabled:
            dev["enabled"] = False
        devices.append(dev)
    return {"users": users, "devices": devices}
