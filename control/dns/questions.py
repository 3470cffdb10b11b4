"""The devices' outstanding questions: an answer teaches only if it answers one of them.

A question is remembered when it passes the gateway on its way to a resolver (after the
ingress program allowed it: a question the policy did not let the device ask never gets
here) under (device address, device port, resolver address, transport, DNS id), with the
name and type asked, and counted in its device's share (a device by name: its addresses,
IPv4 and IPv6, share one). The answer must come back from that resolver to that device and port,
over the same transport, with the same id, repeating the same name and type; it takes the
question away (a second answer to it, or an answer nobody asked for, teaches nothing). The
table is bounded: questions older than LIFETIME seconds are forgotten; one device has at
most PER_DEVICE outstanding (its own oldest goes first), so a device asking fast cannot push
out everyone's questions; and when the whole table is full the oldest goes first.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Optional

from .messages import Question

LIFETIME = 10.0               # a resolver that answers later than this teaches nothing
LIMIT = 16384                 # outstanding questions at once
PER_DEVICE = 256              # outstanding questions of one device at once (dns: questions_per_device)


class Questions:
    def __init__(self, limit: int = LIMIT, lifetime: float = LIFETIME, per_device: int = PER_DEVICE):
        self.limit, self.lifetime, self.per_device = limit, lifetime, per_device
        self.table: OrderedDict[tuple, tuple[Question, float, str]] = OrderedDict()   # oldest first; (.., device)
        self.by_device: dict[str, OrderedDict[tuple, None]] = {}                    # the same keys, per device
        self.forgotten = 0     # pushed out by newer ones while unanswered (a table was full)

    @staticmethod
    def key(device, device_port: int, resolver, transport: str, qid: int) -> tuple:
        return (str(device), device_port, str(resolver), transport, qid)

    def asked(self, key: tuple, question: Question, now: Optional[float] = None,
              device: Optional[str] = None) -> None:
        """Remember QUESTION under KEY; DEVICE: whose share it counts in (by default the
        key's address; the slow path names the device, so its addresses share one)."""
        now = time.monotonic() if now is None else now
        device = key[0] if device is None else device
        self._expire(now)
        self._drop(key)
        mine = self.by_device.get(device, {})
        while len(mine) >= self.per_device:
            self._drop(next(iter(mine)))           # (may remove the device's dict: fetched anew below)
            self.forgotten += 1
        self.by_device.setdefault(device, OrderedDict())[key] = None
        self.table[key] = (question, now, device)
        while len(self.table) > self.limit:
            self._drop(next(iter(self.table)))
            self.forgotten += 1

    def answered(self, key: tuple, question: Question, now: Optional[float] = None) -> bool:
        """True if QUESTION was asked under KEY (and not too long ago); it is taken away."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        held = self.table.get(key)
        if held is None or held[0].name != question.name or held[0].qtype != question.qtype:
            return False
        self._drop(key)
        return True

    def _drop(self, key: tuple) -> None:
        held = self.table.pop(key, None)
        if held is None:
            return
        device = held[2]
        mine = self.by_device[device]
        del mine[key]
        if not mine:
            del self.by_device[device]

    def _expire(self, now: float) -> None:
        while self.table:
            key, (_, when, _) = next(iter(self.table.items()))
            if now - when <= self.lifetime:
                return
            self._drop(key)

    def __len__(self) -> int:
        return len(self.table)
