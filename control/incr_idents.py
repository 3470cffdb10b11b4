"""A new who-token (a rule's principals) for a build changed in place (control/incremental.py).

A token is a bit of every identity class: set where the class's sources match one of the
principals. A new token gets the next bit; the classes of the sources it holds for get the bit,
in place where every source of the class does, else those sources move to a class with the
bit (an existing one with those bits, or a new one): the ident column of the token, computed
for the sources it touches only. Bits of tokens no rule uses any more stay where they are
(no candidate reads them) and keep being kept right by device changes (Sources), so a rule
that names the same principals again finds its token whole.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np

from dataplane.mirrors import IDENT_EXPIRED

from .compiler import Sources
from .model import Identities


class IdentsFull(Exception):
    """The change needs more identity classes or who-bits than the program holds."""


class Members:
    """Who is in a principal: users by group (the identity provider's and the policy's), devices
    by user. Made for one Identities (and the policy's groups), each index when first asked."""

    def __init__(self, identities: Identities, local_groups: dict, before: "Members | None" = None):
        self.identities, self.local_groups = identities, local_groups
        self._by_group = None
        if before is not None and before.identities.users is identities.users and before.local_groups == local_groups:
            self._by_group = before._by_group   # a device change: the users, so the groups, are the same

    @property
    def by_group(self) -> dict:
        if self._by_group is None:
            by_group: dict[str, set[str]] = defaultdict(set)
            for u in self.identities.users:
                for g in set(u.groups).union(u.provider_groups):
                    by_group[g].add(u.key)
            for g, members in self.local_groups.items():
                by_group[g].update(members)
            self._by_group = by_group
        return self._by_group

    def devices(self, principals) -> list:
        users, out = set(), {}
        for p in principals:
            if p.kind == "user":
                users.add(p.name)
            elif p.kind == "group":
                users |= self.by_group.get(p.name, set())
            else:
                d = self.identities.find_device(p.name)
                if d is not None and d.enabled:
                    out[d.name] = d
        for u in users:     # the identities' own index of devices by user (control/lookups.py):
            for d in self.identities.devices_of(u):     # no pass over every device
                if d.enabled:
                    out[d.name] = d
        return list(out.values())


def add_token(token: int, principals, sources: Sources, members: Members, program, bank: int, counts: np.ndarray,
              writes: "SourceWrites") -> None:
    """Give bit TOKEN to the sources PRINCIPALS hold for (every source when there are none),
    in BANK of PROGRAM. COUNTS: sources per identity class (kept up to date here)."""
    bit = 1 << token
    lay = program.layout
    if token >= lay.who_words * 64:
        raise IdentsFull(f"who-bits {token + 1} > {lay.who_words * 64}")
    sources.who_words = max(sources.who_words, (token + 1 + 63) // 64)
    if not principals:
        sources.any_principal |= bit
    for p in principals:
        sources.by_principal[(p.kind, p.name)] |= bit
        if p.kind == "group":
            sources.group_bits[p.name] = sources.by_principal[(p.kind, p.name)]
    rows = program.policy_tables.in_bank("zt_idents", bank).view(np.uint64)
    interner = sources.idents
    if not principals:
        held = list(range(1, len(interner.values) + 1))
        moved: dict[int, list] = {}
    else:
        devices = members.devices(principals)
        addrs = [a for d in devices for a in d.addresses]
        by_class: dict[int, list] = defaultdict(list)
        for addr, ident, device in program.sources_of(addrs):
            if ident and ident != IDENT_EXPIRED:
                by_class[ident].append((addr, device))
        held = [i for i, got in by_class.items() if len(got) == counts[i]]
        moved = {i: got for i, got in by_class.items() if len(got) != counts[i]}
    for i in held:              # every source of the class: the class takes the bit
        _rekey(interner, i, interner.values[i - 1] | bit)
        rows[i, token // 64] |= np.uint64(1 << (token % 64))
        writes.idents.add(i)
    for i, got in moved.items():   # some: they move to the class with their bits and this one
        bits = interner.values[i - 1] | bit
        j = interner.ids.get(bits)
        if j is None:
            j = len(interner.values) + 1
            if j >= lay.max_idents:
                raise IdentsFull(f"identity classes {j + 1} > {lay.max_idents}")
            interner.ids[bits] = j
            interner.values.append(bits)
            rows[j] = np.frombuffer(bits.to_bytes(lay.who_words * 8, "little"), np.uint64)
            writes.idents.add(j)
        counts[i] -= len(got)
        counts[j] += len(got)
        writes.sources += [(addr, j, device) for addr, device in got]


def copied(sources: Sources) -> Sources:
    """SOURCES with its own copy of what add_token() changes (the who-bits of principals, the
    identity classes): the build in force keeps its own until the change is applied, so a
    change staged and discarded leaves the device changes that follow with the classes in
    force. (Device ids only grow: shared.)"""
    out = copy.copy(sources)
    out.by_principal = defaultdict(int, sources.by_principal)
    out.group_bits = dict(sources.group_bits)
    out.idents = copy.copy(sources.idents)
    out.idents.ids, out.idents.values = dict(sources.idents.ids), list(sources.idents.values)
    return out


def forget_classes(sources: Sources, known: int) -> None:
    """Take back the identity classes after the first KNOWN that SOURCES made for a change that
    was not applied (Kernel.stage_devices): they are in no bank, and kept, a later device of
    those bits would get a class whose row was never written."""
    for bits in sources.idents.values[known:]:
        if sources.idents.ids.get(bits, 0) > known:
            del sources.idents.ids[bits]
    del sources.idents.values[known:]


def _rekey(interner, i: int, bits: int) -> None:
    old = interner.values[i - 1]
    if interner.ids.get(old) == i:
        del interner.ids[old]
    interner.values[i - 1] = bits
    interner.ids.setdefault(bits, i)


class SourceWrites:
    """What a change writes on the source side: identity-class rows, and source entries
    (address, ident, device)."""

    def __init__(self):
        self.idents: set[int] = set()
        self.sources: list = []


def class_counts(program, bank: int) -> np.ndarray:
    """Sources per identity class in BANK (the pools' entries and the hash's), by class id up
    to the program's capacity."""
    n = program.layout.max_idents
    counts = np.zeros(n + 1, np.int64)
    for name in ("zt_pool4", "zt_pool6"):
        idents = program.policy_tables.in_bank(name, bank).view(np.uint32)[:, 0]
        used = idents[(idents != 0) & (idents != IDENT_EXPIRED) & (idents <= n)]
        counts += np.bincount(used, minlength=n + 1)[:n + 1]
    for ident, _ in program.policy_tables._hashed[bank].values():
        if 0 < ident <= n:
            counts[ident] += 1
    return counts
