"""DNS over TCP across segments: each flow's bytes in order, cut into its 2-byte-length-prefixed
messages. A message split over segments teaches when the segment that completes it arrives:
the slow path learns from the whole message before it releases that segment, and the device
cannot read the answer before it has that last segment. Earlier segments are released at once
(their bytes are copied here), so only a bounded copy of each flow's unfinished message waits.

A flow is (source, source port, destination, destination port): a device's questions and a
resolver's answers are two flows. A flow is followed only from its SYN (the device's SYN for
its questions, the resolver's SYN-ACK for its answers): there its first byte's sequence number
is known, so the gateway reads the messages where the device reads them. Data of a flow with
no stream (no SYN seen: a connection open when the gateway started, or a stream dropped)
teaches nothing, counted "unfollowed": the device chooses where segments start (its window,
its MSS) and what the resolver echoes (the question's name), so bytes read from an unknown
offset could be a forged answer. Segments come in order: a retransmission of bytes already
read adds only what is new; a gap (a segment lost before the gateway, or reordered) or a
length of 0 ends the stream ("gap", "zero-length") and the flow teaches nothing until its
next SYN. FIN and RST end the stream.

Bounded, per device (DEVICE: the device the caller names, whatever address it used): at most
PER_DEVICE flows and PER_DEVICE_BYTES of unfinished messages (its own least recently used
stream goes first); in all MAX_STREAMS flows and MAX_BYTES (the least recently used stream of
the device holding the most goes first), "evicted"; a stream with no new byte for LIFETIME
seconds goes ("expired"). Only new bytes make a stream recently used: a retransmission does
not keep it. A stream pushed out leaves its flow silent, as above. A device opening many
connections, or holding many unfinished messages, thus pushes out its own streams first.
"""
from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from .wire import FIN, RST, SYN, Segment

MAX_STREAMS = 256             # TCP flows followed at once
PER_DEVICE = 16               # of them, one device's
MAX_BYTES = 4 << 20           # bytes of unfinished messages held in all (a message is at most 65537)
PER_DEVICE_BYTES = 512 << 10  # of them, one device's (8 of the largest messages)
LIFETIME = 10.0               # seconds a stream may wait for its next new byte
SEQ = 1 << 32


@dataclass
class Stream:
    next_seq: int             # the sequence number of the next byte expected
    seen: float               # when its last new byte (or its SYN) came
    data: bytearray = field(default_factory=bytearray)   # the unfinished message's bytes so far


class Streams:
    def __init__(self, max_streams: int = MAX_STREAMS, max_bytes: int = MAX_BYTES, lifetime: float = LIFETIME,
                 per_device: int = PER_DEVICE, per_device_bytes: int = PER_DEVICE_BYTES):
        self.max_streams, self.max_bytes, self.lifetime = max_streams, max_bytes, lifetime
        self.per_device, self.per_device_bytes = per_device, per_device_bytes
        self.table: OrderedDict[tuple, Stream] = OrderedDict()     # least recently used first
        self.by_device: dict[str, OrderedDict[tuple, None]] = {}  # the same keys, per device
        self.held = 0                                              # bytes of unfinished messages
        self.held_by: Counter = Counter()                          # the same, per device
        # given up, by why: messages (gap, zero-length, evicted, expired, closed) and data of
        # flows not followed (unfollowed, a segment at a time)
        self.dropped: Counter = Counter()

    def feed(self, seg: Segment, device: str, now: float) -> list[bytes]:
        """The DNS messages SEG completes, in order (none: it only adds to one, or has no data,
        or its flow is not followed). DEVICE: the flow's device (the source of questions, the
        destination of answers)."""
        key = (str(seg.src), seg.sport, str(seg.dst), seg.dport, device)
        self._expire(now)
        if seg.flags & RST:
            self._drop(key, "closed")
            return []
        if seg.flags & SYN:
            self._drop(key, "closed")
            self._keep(key, Stream((seg.seq + 1) % SEQ, now))
            return []
        out = self._take(key, seg, now) if seg.payload else []
        if seg.flags & FIN:
            self._drop(key, "closed")
        return out

    def _take(self, key: tuple, seg: Segment, now: float) -> list[bytes]:
        stream = self.table.get(key)
        if stream is None:                                 # no SYN seen: where messages start is unknown
            self.dropped["unfollowed"] += 1
            return []
        data = seg.payload
        ahead = (seg.seq - stream.next_seq) % SEQ
        if ahead and ahead < SEQ // 2:                     # bytes missing before this segment
            self._drop(key, "gap", always=True)
            return []
        if ahead:                                          # starts before the next byte: a retransmission
            old = SEQ - ahead
            if old >= len(data):
                return []                                  # nothing new: the stream is not refreshed
            data = data[old:]
        self._hold(key, len(stream.data), -1)
        stream.data += data
        stream.next_seq = (stream.next_seq + len(data)) % SEQ
        stream.seen = now
        messages, broken = self._messages(stream)
        self._hold(key, len(stream.data), 1)
        if broken:
            self._drop(key, "zero-length", always=True)
            return messages
        self._keep(key, stream)
        return messages

    @staticmethod
    def _messages(stream: Stream) -> tuple[list[bytes], bool]:
        """Whole messages off the front of STREAM's bytes (what remains is unfinished), and
        whether a length of 0 came: no DNS message, and no way to know where the next starts."""
        out, at, data = [], 0, stream.data
        while at + 2 <= len(data):
            (n,) = struct.unpack_from("!H", data, at)
            if n == 0:
                return out, True
            if at + 2 + n > len(data):
                break
            out.append(bytes(data[at + 2:at + 2 + n]))
            at += 2 + n
        del data[:at]
        return out, False

    def _hold(self, key: tuple, n: int, sign: int) -> None:
        self.held += sign * n
        self.held_by[key[-1]] += sign * n
        if self.held_by[key[-1]] <= 0:
            del self.held_by[key[-1]]

    def _keep(self, key: tuple, stream: Stream) -> None:
        device = key[-1]
        mine = self.by_device.get(device, {})
        while key not in mine and len(mine) >= self.per_device:
            self._drop(next(iter(mine)), "evicted")        # (may remove the device's dict: fetched anew below)
        mine = self.by_device.setdefault(device, OrderedDict())
        self.table[key] = stream
        self.table.move_to_end(key)
        mine[key] = None
        mine.move_to_end(key)
        while self.held_by[device] > self.per_device_bytes and len(self.by_device[device]) > 1:
            self._drop(next(iter(self.by_device[device])), "evicted")
        while len(self.table) > self.max_streams:
            self._drop(self._oldest_of(max(self.by_device, key=lambda d: len(self.by_device[d]))), "evicted")
        while self.held > self.max_bytes:
            self._drop(self._oldest_of(max(self.held_by, key=self.held_by.__getitem__)), "evicted")

    def _oldest_of(self, device: str) -> tuple:
        return next(iter(self.by_device[device]))

    def _drop(self, key: tuple, why: str, always: bool = False) -> None:
        """Forget KEY's stream; counted under WHY if it held an unfinished message (or ALWAYS)."""
        stream = self.table.pop(key, None)
        if stream is None:
            return
        mine = self.by_device[key[-1]]
        del mine[key]
        if not mine:
            del self.by_device[key[-1]]
        if stream.data:
            self._hold(key, len(stream.data), -1)
        if stream.data or always:
            self.dropped[why] += 1

    def _expire(self, now: float) -> None:
        while self.table:
            key, stream = next(iter(self.table.items()))
            if now - stream.seen <= self.lifetime:
                return
            self._drop(key, "expired")

    def __len__(self) -> int:
        return len(self.table)
