"""Flow events from the kernel: the ring buffer the program writes (struct zt_event in
ebpf/maps.h, mirrored as dataplane/mirrors.py's EVENT), read with libbpf's ring_buffer API.

The kernel writes an event for each drop and each new allowed flow, limits itself, and
counts what it did not write (Program.event_counters()); reading never slows it down. With a
pin_dir the ring buffer is shared by every build, so one reader follows the gateway across
program swaps: EventReader.pinned(pin_dir)."""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import KernelError
from .libbpf import RingSampleFn, libbpf, obj_get
from .mirrors import EVENT
from .program import Program
from .reasons import Reason, Verdict

STOP = -errno.ECANCELED     # what the sample callback returns to end a poll at its deadline


@dataclass(frozen=True)
class Event:
    time_ns: int            # CLOCK_MONOTONIC (time.monotonic_ns() is the same clock)
    build: int              # the build that decided (Program(build=...))
    device: int             # device id in that build's tables; 0: none
    ident: int              # identity class; 0: none
    rule: int               # rule id in that build's tables; 0: none (default action or no decision)
    family: int             # 4, 6, or 0 when the packet was unreadable before its addresses
    src: Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]
    dst: Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]
    proto: int
    sport: int              # 0 unless TCP or UDP
    dport: int
    verdict: Verdict
    reason: Reason
    length: int             # bytes of the frame as XDP saw it
    name: int = 0           # the deciding rule's name token when a learned name decided; 0: none
                            # (Kernel.hostname(name, dst, build) tells the name)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Event":
        (time_ns, build, device, ident, rule, length, sport, dport, src, dst, family, proto, verdict, reason,
         name, _) = EVENT.unpack_from(raw)
        if family == 4:
            s, d = ipaddress.IPv4Address(src[:4]), ipaddress.IPv4Address(dst[:4])
        elif family == 6:
            s, d = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
        else:
            s = d = None
        return cls(time_ns, build, device, ident, rule, family, s, d, proto, sport, dport, Verdict(verdict),
                   Reason(reason), length, name)


class EventReader:
    """Reads flow events from a Program's ring buffer, or from the one pinned under a pin_dir
    (pinned(): every build's events, across swaps and restarts). One reader per ring buffer:
    reading consumes."""

    def __init__(self, program: Program):
        self._open(os.dup(program.bpf["zt_events"].get_fd()))

    @classmethod
    def pinned(cls, pin_dir: Union[str, Path]) -> "EventReader":
        reader = cls.__new__(cls)
        reader._open(obj_get(Path(pin_dir) / "zt_events"))
        return reader

    def _open(self, fd: int) -> None:
        self._fd = fd
        self._batch: list[bytes] = []
        self._deadline = 0.0
        self._callback = RingSampleFn(self._sample)    # kept: libbpf holds only the pointer
        rb = libbpf().ring_buffer__new(fd, self._callback, None, None)
        if not rb:
            err = ctypes.get_errno()
            os.close(fd)
            raise KernelError(f"cannot open the flow-event ring buffer: {os.strerror(err)}")
        self._rb = rb

    def _sample(self, ctx, data, size) -> int:
        # Runs inside ring_buffer__poll, on the caller's thread: copy, parse later.
        self._batch.append(ctypes.string_at(data, size))
        return STOP if time.monotonic() >= self._deadline else 0

    def poll(self, timeout_ms: int) -> list[Event]:
        """The events written since the last poll, waiting up to timeout_ms for the first one
        (0: do not wait). Returns by the deadline even when more are waiting: the next poll
        gets them."""
        if self._rb is None:
            raise KernelError("the event reader is closed")
        self._batch = []
        self._deadline = time.monotonic() + max(0, timeout_ms) / 1000
        ret = libbpf().ring_buffer__poll(self._rb, max(0, timeout_ms))
        if ret < 0 and ret not in (STOP, -errno.EINTR):
            raise KernelError(f"reading flow events: {os.strerror(-ret)}")
        batch, self._batch = self._batch, []
        return [Event.from_bytes(raw) for raw in batch]

    def close(self) -> None:
        if getattr(self, "_rb", None) is not None:
            libbpf().ring_buffer__free(self._rb)
            self._rb = None
            os.close(self._fd)

    def __enter__(self) -> "EventReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()
