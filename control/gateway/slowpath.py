"""The DNS slow path as the gateway runs it (control/dns): started after the gateway (the
kernel must be there to learn into), stopped before it; `ztgate dns list`; its counters.

What an answer teaches goes to the hostnames side of the gateway (Gateway.dns_learned, from
control/learned.py and the kernel), which holds the learned table and writes the kernel;
this file only hands answers over and shows the table.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from ..dns import netfilter
from ..dns.messages import Refused
from ..dns.slowpath import SlowPath
from ..errors import InputError
from .core import Core

log = logging.getLogger("ztgate.dns")


class SlowPathOps(Core):
    slowpath: Optional[SlowPath] = None
    _askers: tuple = (None, {})

    def dns_start(self) -> None:
        """Start reading answers, if resolvers are configured; remove the chain a crashed
        gateway left either way. A slow path that cannot start is logged, and the gateway
        goes on: answers then pass unlearned, and hostname rules allow nothing (fail closed)."""
        netfilter.remove(self.config.interface)
        if not self.config.dns.enabled:
            return
        sp = SlowPath(self.config.dns, self.config.interface, self._dns_learn, self._asker_of)
        try:
            sp.start()
        except Exception as e:
            log.error("the DNS slow path cannot start (%s): answers pass unlearned, hostname rules allow "
                      "nothing", e)
            return
        self.slowpath = sp

    def dns_stop(self) -> None:
        if self.slowpath is not None:
            self.slowpath.stop()
            self.slowpath = None

    def _dns_learn(self, taught: list, asker: str) -> int:
        """One answer's (name, address, ttl), written into the kernel before it is released
        (Gateway.dns_learned, control/gateway/hostnames.py); how many the bounds kept.
        Refused("unnamed") when no rule names any of its names (nothing to learn: most
        answers; the kernel checks again under its lock, as the build in force may change)."""
        if not any(self.kernel.named(name) for name, _, _ in taught):
            # counted as Kernel.learn counts them, under its lock (the metrics read them under it)
            with self.kernel.learned_lock:
                self.kernel.learned.refused["unnamed"] += len(taught)
            raise Refused("unnamed")
        return self.dns_learned([(name, address, ttl, asker) for name, address, ttl in taught])

    def _asker_of(self, address: str) -> str:
        """The device that has this tunnel address, by name (its address if none has it)."""
        identities = self.identities
        if self._askers[0] is not identities:
            self._askers = (identities, {str(a): d.name for d in identities.devices for a in d.addresses})
        return self._askers[1].get(address, address)

    def dns_list(self, name: Optional[str] = None) -> dict:
        """The learned names: each address with its expiry (Unix time) and who asked; and the
        slow path's counters."""
        if name is not None and not name.strip():
            raise InputError("dns.list: name must not be empty")
        now = time.time()
        rows = [{"name": e["name"], "address": e["address"], "expires": round(now + e["expires_in"], 1),
                 "expires_in": e["expires_in"], "asker": e["asker"]} for e in self.dns_entries(name)]
        sp = self.slowpath
        return {"enabled": sp is not None, "resolvers": [str(r) for r in self.config.dns.resolvers],
                "learned": rows, "counters": sp.snapshot() if sp else None}
