"""Hostnames (spec/POLICY.md, "Hostnames"): what a name in a rule is, which names it matches,
and the table of addresses learned for names from the private resolvers' answers.

The slow path (the NFQUEUE DNS reader) and the gateway use this API:

    hostname_problem(text) -> str              "" for a valid rule hostname, else what is wrong
    normalize(name) -> str                     a name as DNS writes it -> as rules compare it
    matches(pattern, name) -> bool             exact, or "*.suffix" (one or more labels more)

    Patterns(token_patterns)                   the policy's name tokens (compiler.Tables.names)
      .tokens(name) -> int                     bit t set: token t's patterns match the name
      .bits(names) -> int                      the same for a set of names (an address's)

    Learned(min_ttl=60, max_ttl=86400, max_per_name=64, max_total=16384, max_per_device=1024,
            clock=time.monotonic)
      .learn(name, address, ttl, asker=None, now=None) -> bool
                                               False: refused by a bound (counted in .refused)
      .expire(now=None) -> list[Entry]         the entries whose time came, removed
      .forget(name=None) -> list[Entry]        removed at once (all, or one name's)
      .entries(name=None) -> list[Entry]       sorted by name, then address
      .names_of(address) -> frozenset[str]     the names an address is learned for now
      .by_address(addresses=None) -> dict      address -> names_of(address), for the kernel
      .next_expiry() -> Optional[float]        when expire() next has work (the clock's time)
      .refused: Counter                        "per_name", "total", "per_device": answers' addresses
                                               not kept; "unnamed": no rule names the name (Kernel.learn)

    Entry(name, address, expires, asker)       expires: on the table's clock

The gateway holds one table, in its Kernel (control/kernel.py), which writes it into the
build in force in place (zt_learned; no compile) under its own lock:

    Kernel.learned: Learned
    Kernel.learn(answers, now=None) -> int     answers: (name, address, ttl, asker) tuples; how many kept
                                               (only names a rule of the build in force names)
    Kernel.named(name) -> bool                 a rule of the build in force names it (or no build)
    Kernel.expire(now=None) -> list[Entry]     what expired by now, out of the table and the kernel
    Kernel.forget(name=None) -> list[Entry]    out at once (all, or one name's)
    Kernel.next_expiry() -> Optional[float]
    Kernel.learned_entries(name=None) -> list[Entry]
    Kernel.learned_names(address) -> frozenset[str]
    Kernel.hostname(token, dst, build_number=None) -> Optional[str]   the name a kernel decision's name token came from

and the gateway (control/gateway/hostnames.py) schedules expiry (a timer, never a packet):

    Gateway.dns_learned(answers) -> int        Kernel.learn, then the expiry timer moved if need be
    Gateway.dns_expire() -> list[Entry]        the timer's call
    Gateway.dns_entries(name=None) -> list[dict]   name, address, expires_in (s), asker

The bounds come from the gateway config's `dns:` section when it has one (min_ttl, max_ttl,
max_per_name, max_total, max_per_device: control/kernel.py's learned_settings()), else the
defaults above. max_per_device bounds the pairs one asker brought in that are still learned
(renewals by anyone count for the one who brought the pair in), so one device cannot fill
the table for everyone; an answer with no asker (None) is bounded by the other two only.
Kernel.learn keeps only names that a rule of the build in force names (its Patterns), so
the names of all the other answers take no room either.

Times are on `clock` (default time.monotonic, which the gateway's timers use); a TTL is
clamped to [min_ttl, max_ttl] as the spec says. A (name, address) learned again keeps the
later of its two expiries. The bounds refuse new entries rather than evict old ones: what a
device already resolved stays valid for its TTL, and a flood of answers cannot push it out.
"""
from __future__ import annotations

import heapq
import ipaddress
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from .model import Address

LABEL = re.compile(r"[A-Za-z0-9-]{1,63}\Z")
MAX_NAME = 253
HEAP_SLACK = 64               # stale expiry-heap items allowed over 2 per live entry


def hostname_problem(text: str) -> str:
    """What makes TEXT not a rule hostname (spec: labels of letters, digits and hyphens, 1-63
    characters, 253 in all, `*` only as the whole leftmost label of a longer name), or "".
    One trailing dot is the same name (names compare without it: normalize() drops it)."""
    if text.endswith(".") and text != ".":
        text = text[:-1]
    if len(text) > MAX_NAME:
        return f"is {len(text)} characters long; a DNS name has at most {MAX_NAME}"
    labels = text.split(".")
    if labels[0] == "*":
        if len(labels) == 1:
            return "alone would match every name: a wildcard names the domain below it ('*.corp.example')"
        labels = labels[1:]
    for label in labels:
        if "*" in label:
            return "has '*' other than as its whole leftmost label ('*.corp.example')"
        if not LABEL.match(label):
            return (f"has the label {label!r}: labels are 1-63 letters, digits and hyphens" if label
                    else "has an empty label")
    return ""


def normalize(name: str) -> str:
    """A name as rules compare it: lower case, without the trailing dot DNS writes."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def matches(pattern: str, name: str) -> bool:
    """PATTERN (normalized) matches NAME (normalized): equal, or for "*.d" a name ending in ".d"
    with at least one label before it (not d itself)."""
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return len(name) > len(suffix) and name.endswith(suffix)
    return pattern == name


class Patterns:
    """The policy's name tokens: token t (1-based, as the compiler numbers them) is the set of
    patterns one or more rules name. tokens(name) is a few dict lookups per name (one per
    label), whatever the number of patterns."""

    def __init__(self, token_patterns: Iterable[Iterable[str]]):
        self.exact: dict[str, int] = {}
        self.below: dict[str, int] = {}        # "d" -> bits of tokens holding "*.d"
        self.count = 0
        for t, patterns in enumerate(token_patterns, start=1):
            self.count = t
            for p in patterns:
                table, key = (self.below, p[2:]) if p.startswith("*.") else (self.exact, p)
                table[key] = table.get(key, 0) | 1 << t

    def tokens(self, name: str) -> int:
        bits = self.exact.get(name, 0)
        dot = name.find(".")
        while dot >= 0:
            bits |= self.below.get(name[dot + 1:], 0)
            dot = name.find(".", dot + 1)
        return bits

    def bits(self, names: Iterable[str]) -> int:
        out = 0
        for n in names:
            out |= self.tokens(n)
        return out


@dataclass(frozen=True)
class Entry:
    name: str
    address: Address
    expires: float              # on the table's clock
    asker: Optional[str] = None  # who asked (the device, as the slow path names it)


class Learned:
    """Name -> addresses, each until its expiry, bounded per name and in all."""

    def __init__(self, min_ttl: int = 60, max_ttl: int = 86400, max_per_name: int = 64, max_total: int = 16384,
                 max_per_device: int = 1024, clock: Callable[[], float] = time.monotonic):
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError(f"min_ttl {min_ttl} must lie in 0..max_ttl {max_ttl}")
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self.max_per_name, self.max_total, self.max_per_device = max_per_name, max_total, max_per_device
        self.clock = clock
        self._by_name: dict[str, dict[Address, Entry]] = {}
        self._by_address: dict[Address, set[str]] = {}
        self._heap: list[tuple[float, str, str]] = []   # (expires, name, address text): may hold stale items
        self.total = 0
        self.refused: Counter = Counter()
        self._brought: dict[tuple[str, Address], str] = {}   # (name, address) -> the asker who brought it in
        self.per_device: Counter = Counter()                  # asker -> pairs it brought in, still learned

    def learn(self, name: str, address, ttl: float, asker: Optional[str] = None, now: Optional[float] = None) -> bool:
        """ADDRESS stands for NAME for TTL seconds (clamped) from NOW. False when a bound refused it."""
        name = normalize(name)
        address = ipaddress.ip_address(address)
        now = self.clock() if now is None else now
        expires = now + min(max(ttl, self.min_ttl), self.max_ttl)
        held = self._by_name.get(name, {})
        old = held.get(address)
        if old is None:
            if len(held) >= self.max_per_name:
                self.refused["per_name"] += 1
                return False
            if self.total >= self.max_total:
                self.refused["total"] += 1
                return False
            if asker is not None:
                if self.per_device[asker] >= self.max_per_device:
                    self.refused["per_device"] += 1
                    return False
                self.per_device[asker] += 1
                self._brought[(name, address)] = asker
            self.total += 1
            self._by_name.setdefault(name, held)
            self._by_address.setdefault(address, set()).add(name)
        elif old.expires >= expires:
            held[address] = Entry(name, address, old.expires, asker or old.asker)
            return True
        held[address] = Entry(name, address, expires, asker or (old.asker if old else None))
        heapq.heappush(self._heap, (expires, name, str(address)))
        if len(self._heap) > 2 * self.total + HEAP_SLACK:
            self._rebuild_heap()
        return True

    def _rebuild_heap(self) -> None:
        """One heap item per entry again. A renewal pushes a new item and leaves the old one
        stale until it reaches the top, so answers repeated for a long TTL would grow the heap
        without bound; rebuilt when it is twice the live entries, the cost is amortized O(1)
        per learn and the heap stays within 2 * total + HEAP_SLACK."""
        self._heap = [(e.expires, e.name, str(e.address)) for held in self._by_name.values() for e in held.values()]
        heapq.heapify(self._heap)

    def expire(self, now: Optional[float] = None) -> list[Entry]:
        now = self.clock() if now is None else now
        gone = []
        while self._heap and self._heap[0][0] <= now:
            expires, name, text = heapq.heappop(self._heap)
            entry = self._by_name.get(name, {}).get(ipaddress.ip_address(text))
            if entry is not None and entry.expires == expires:     # else renewed since, or forgotten
                self._remove(entry)
                gone.append(entry)
        return gone

    def forget(self, name: Optional[str] = None) -> list[Entry]:
        gone = self.entries(name)
        for e in gone:
            self._remove(e)
        return gone

    def _remove(self, entry: Entry) -> None:
        held = self._by_name[entry.name]
        del held[entry.address]
        if not held:
            del self._by_name[entry.name]
        names = self._by_address[entry.address]
        names.discard(entry.name)
        if not names:
            del self._by_address[entry.address]
        self.total -= 1
        asker = self._brought.pop((entry.name, entry.address), None)
        if asker is not None:
            self.per_device[asker] -= 1
            if not self.per_device[asker]:
                del self.per_device[asker]

    def entries(self, name: Optional[str] = None) -> list[Entry]:
        names = [normalize(name)] if name is not None else sorted(self._by_name)
        return [e for n in names for _, e in sorted(self._by_name.get(n, {}).items(),
                                                     key=lambda kv: (kv[0].version, kv[0]))]

    def names_of(self, address) -> frozenset[str]:
        return frozenset(self._by_address.get(ipaddress.ip_address(address), ()))

    def by_address(self, addresses: Optional[Iterable] = None) -> dict[Address, frozenset[str]]:
        """Address -> the names it stands for now (empty: none any more), for these addresses
        (default: every address learned)."""
        if addresses is None:
            return {a: frozenset(n) for a, n in self._by_address.items()}
        return {a: self.names_of(a) for a in addresses}

    def next_expiry(self) -> Optional[float]:
        while self._heap:
            expires, name, text = self._heap[0]
            entry = self._by_name.get(name, {}).get(ipaddress.ip_address(text))
            if entry is not None and entry.expires == expires:
                return expires
            heapq.heappop(self._heap)         # stale: renewed or forgotten
        return None

    def __len__(self) -> int:
        return self.total


def load_learned(path) -> dict[Address, frozenset[str]]:
    """The probes' `--dns LEARNED.jsonl`: one {"name", "address"} a line, each valid for the
    whole run. Address -> the names it was learned for. A bad line is refused naming it."""
    import json

    from .errors import InputError

    out: dict[Address, set[str]] = {}
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict) or set(doc) != {"name", "address"}:
                    raise ValueError('want {"name": ..., "address": ...}')
                name = normalize(doc["name"]) if isinstance(doc["name"], str) else ""
                problem = hostname_problem(name) if name else "is not a name"
                if problem or name.startswith("*"):
                    raise ValueError(f"name {doc['name']!r}: {problem or 'a learned name has no wildcard'}")
                address = ipaddress.ip_address(doc["address"])
            except (ValueError, TypeError) as e:
                raise InputError(f"{path}:{n}: {e}") from None
            out.setdefault(address, set()).add(name)
    return {a: frozenset(n) for a, n in out.items()}
