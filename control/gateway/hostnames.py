"""Names learned from DNS answers (spec/POLICY.md, Hostnames): the slow path hands the gateway
each answer's addresses; the gateway writes them into the kernel before the answer goes on
(Kernel.learn), and takes each one away at its expiry, on a timer of its own (never on a
packet), so that flows it allowed are decided again then (Kernel.expire).

    Gateway.dns_learned(answers) -> int        answers: (name, address, ttl, asker) tuples
    Gateway.dns_expire() -> list[Entry]        what expired now (the timer calls it)
    Gateway.dns_entries(name=None) -> list[dict]   name, address, expires_in (s), asker
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Optional

from ..learned import Entry
from .core import Core

log = logging.getLogger("ztgate.hostnames")


class HostnameOps(Core):
    _expiry_timer: Optional[threading.Timer] = None
    _expiry_at: Optional[float] = None
    _expiry_lock = threading.Lock()

    def dns_learned(self, answers: Iterable[tuple]) -> int:
        """Learn these answers in the table and the kernel (in place, no compile: only this
        name's verdicts change); how many were kept (the rest refused by the table's bounds).
        Does not take the gateway's lock: a policy change compiling does not hold answers."""
        kept = self.kernel.learn(answers)
        self._schedule_expiry()
        return kept

    def dns_expire(self) -> list[Entry]:
        gone = self.kernel.expire()
        if gone:
            log.info("expired %d learned addresses (%s)", len(gone),
                     ", ".join(sorted({e.name for e in gone}))[:200])
        self._schedule_expiry()
        return gone

    def dns_entries(self, name: Optional[str] = None) -> list[dict]:
        now = self.kernel.learned.clock()
        return [{"name": e.name, "address": str(e.address), "expires_in": round(e.expires - now, 1),
                 "asker": e.asker} for e in self.kernel.learned_entries(name)]

    def _schedule_expiry(self) -> None:
        """One timer, for the table's next expiry (moved when an earlier one comes)."""
        with self._expiry_lock:
            when = self.kernel.next_expiry()
            timer = self._expiry_timer
            pending = timer is not None and timer.is_alive() and timer is not threading.current_thread()
            if pending and when is not None and self._expiry_at <= when:
                return
            if pending:
                timer.cancel()
            self._expiry_timer, self._expiry_at = None, when
            if when is None:
                return
            timer = threading.Timer(max(0.0, when - time.monotonic()), self.dns_expire)
            timer.daemon = True
            timer.name = "dns-expiry"
            self._expiry_timer = timer
            timer.start()
