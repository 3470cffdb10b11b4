"""The clock that ends sessions: one timer thread over a heap of deadlines (unix seconds).

Expiry must not wait for a packet or a poll of the store (IDENTITY.md, "Sessions"): every
session's end is added here when it starts or is renewed, and at each deadline the thread
calls `due()`, which writes the devices whose sessions are over into the kernel. A renewed
session leaves its old deadline in the heap: due() finds nothing to do then (it reads what
is over from the state, not from the heap), which keeps the heap free of bookkeeping.
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("ztgate.expiry")
LONGEST_WAIT = 3600.0     # wake at least hourly (the wall clock may have been set meanwhile)


class ExpiryClock:
    def __init__(self, due: Callable[[], None]):
        self._due = due
        self._deadlines: list[float] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, when: float) -> None:
        """Call due() at WHEN (at once if it is past)."""
        with self._wake:
            heapq.heappush(self._deadlines, when)
            self._wake.notify()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ztgate-expiry", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with self._wake:
            while not self._stopped:
                if not self._deadlines:
                    self._wake.wait(LONGEST_WAIT)
                    continue
                delay = self._deadlines[0] - time.time()
                if delay > 0:
                    self._wake.wait(min(delay, LONGEST_WAIT))
                    continue
                while self._deadlines and self._deadlines[0] <= time.time():
                    heapq.heappop(self._deadlines)
                self._wake.release()     # due() takes the gateway lock: never under ours
                failed = False
                try:
                    self._due()
                except Exception:
                    log.exception("ending the sessions that are over: trying again in a second")
                    failed = True
                finally:
                    self._wake.acquire()
                if failed:
                    heapq.heappush(self._deadlines, time.time() + 1)
