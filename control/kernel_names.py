"""The Kernel's learned names (spec/POLICY.md, "Hostnames"): addresses learned from DNS answers
written into the build in force in place, no compile, and into a new build before it is put
in force (control/kernel.py's stage_swap, _flip and _switch call _catch_up_learned). A part of
Kernel kept apart for its size: it uses Kernel's learned table, lock and builds."""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Iterable, Optional

from .learned import Entry, normalize
from .model import Address

if TYPE_CHECKING:
    from .kernel import Build


class LearnedNames:

    def learn(self, answers: Iterable[tuple], now: Optional[float] = None) -> int:
        """(name, address, ttl, asker) answers into the learned table and the build in force,
        before it returns: a packet decided after it sees them. How many were kept (the rest
        refused by the table's bounds, or because no rule of the build in force names the
        name: counted in self.learned.refused, "unnamed" for those). With no build in force
        (a Kernel attached to nothing) every name is kept."""
        with self.learned_lock:
            kept, touched = 0, set()
            for name, address, ttl, asker in answers:
                if not self.named(name):
                    self.learned.refused["unnamed"] += 1
                elif self.learned.learn(name, address, ttl, asker, now):
                    kept += 1
                    touched.add(ipaddress.ip_address(address))
            self._write_learned(touched)
            return kept

    def named(self, name: str) -> bool:
        """Some rule of the build in force names NAME (exact or by a wildcard), or no build is
        in force. A name no rule names is not learned: it would decide nothing, and a device
        resolving many names would fill the table. A rule added later takes effect for a
        name with its next answer."""
        build = self.build
        return build is None or bool(build.tables.names.tokens(normalize(name)))

    def expire(self, now: Optional[float] = None) -> list[Entry]:
        """Take out of the table and the kernel what expired by NOW; flows those addresses
        allowed are decided again."""
        with self.learned_lock:
            gone = self.learned.expire(now)
            self._write_learned({e.address for e in gone})
            return gone

    def forget(self, name: Optional[str] = None) -> list[Entry]:
        """Take NAME's addresses (None: every name's) out of the table and the kernel at once."""
        with self.learned_lock:
            gone = self.learned.forget(name)
            self._write_learned({e.address for e in gone})
            return gone

    def next_expiry(self) -> Optional[float]:
        """When expire() next has work, on the table's clock (time.monotonic)."""
        with self.learned_lock:
            return self.learned.next_expiry()

    def hostname(self, token: int, dst: Address, build_number: Optional[int] = None) -> Optional[str]:
        """The name a decision with name token TOKEN (RunResult.name, a flow event's) came
        from: the first, in order, of the names DST is learned for now that the token's rule
        names. The token is read with the tables of BUILD_NUMBER (a flow event's build: tokens
        are numbered per build, so an older build's are found in self.names, as rule_name
        finds its rules), or of the build in force when None. None when TOKEN is 0, the build
        is no longer kept, or DST has since expired."""
        build = self.build if build_number is None else self.names.get(build_number)
        if not token or build is None:
            return None
        with self.learned_lock:
            held = sorted(self.learned.names_of(dst))
        return next((n for n in held if build.tables.names.tokens(n) >> token & 1), None)

    def learned_names(self, address) -> frozenset:
        """The names ADDRESS is learned for now."""
        with self.learned_lock:
            return self.learned.names_of(address)

    def learned_entries(self, name: Optional[str] = None) -> list[Entry]:
        with self.learned_lock:
            return self.learned.entries(name)

    def _write_learned(self, addresses: set[Address]) -> None:
        """These addresses' name bits, as the table has them now, into the build in force. The
        epoch moves when a bit went away, or came for a block rule: an allowed flow may no
        longer be (a learned bit for an allow rule only allows more)."""
        build = self.build
        if build is None or not addresses:
            return
        tables, writes, revoke = build.tables, [], False
        for addr in addresses:
            old, bits = tables.learned.get(addr, 0), tables.names.bits(self.learned.names_of(addr))
            if bits == old:
                continue
            writes.append((addr, bits))
            revoke = revoke or bool(old & ~bits) or bool(bits & ~old & tables.block_names)
            if bits:
                tables.learned[addr] = bits
            else:
                tables.learned.pop(addr, None)
        build.program.set_learned(writes, build.bank)
        if revoke:
            # no settle: a packet reads the epoch before the tables, so one that reads the new
            # epoch sees the new bits (as stage_devices)
            build.program.next_epoch()

    def _catch_up_learned(self, new: Build) -> None:
        """NEW was compiled with the table as it was then: what was learned or expired since
        goes into its bank before it is attached or flipped (under learned_lock: learning writes
        only the bank in force, so the other bank has nothing learned meanwhile but this)."""
        now = {a: bits for a, bits in ((a, new.tables.names.bits(n)) for a, n in self.learned.by_address().items())
               if bits}
        if now != new.tables.learned:
            gone = [(a, 0) for a in new.tables.learned if a not in now]
            new.program.set_learned(gone + [(a, b) for a, b in now.items() if new.tables.learned.get(a) != b],
                                    new.bank)
            new.tables.learned = now

