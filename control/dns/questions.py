"""The devices' outstanding questions: an answer teaches only if it answers one of them.

A question is remembered when it passes the gateway on its way to a resolver (after the
ingress program allowed it: a question the policy did not let the device ask never gets
here) under (device address, device port, resolver address, transport, DNS id), with the
name and type asked. The answer must come back from that resolver to that device and port,
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
        self.table: OrderedDict[tuple, tuple[Question, float]] = OrderedDict()     # oldest first
        self.by_device: dict[str, OrderedDict[tuple, None]] = {}                    # the same keys, per device
        self.forgotten = 0     # pushed out by newer ones while unanswered (a table was full)

    @staticmethod
    def key(device, device_port: int, resolver, transport: str, qid: int) -> tuple:
        return (str(device), device_port, str(resolver), transport, qid)

    def asked(self, key: tuple, question: Question, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        self._expire(now)
        self._drop(key)
        mine = self.by_device.setdefault(key[0], OrderedDict())
        while len(mine) >= self.per_device:
            self._drop(next(iter(mine)))
            self.forgotten += 1
        self.table[key] = (question, now)
        mine[key] = None
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
        if self.table.pop(key, None) is None:
            return
        mine = self.by_device[key[0]]
        del mine[key]
        if not mine:
            del self.by_device[key[0]]

    def _expire(self, now: float) -> None:
        while self.table:
            key, (_, when) = next(iter(self.table.items()))
            if now - when <= self.lifetime:
                return
            self._drop(key)

    def __len__(self) -> int:
        return len(self.table)
