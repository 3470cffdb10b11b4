"""DNS over TCP across segments: each flow's bytes in order, cut into its 2-byte-length-prefixed
messages. A message split over segments teaches when the segment that completes it arrives:
the slow path learns from the whole message before it releases that segment, and the device
cannot read the answer before it has that last segment. Earlier segments are released at once
(their bytes are copied here), so only a bounded copy of each flow's unfinished message waits.

A flow is (source, source port, destination, destination port): a device's questions and a
resolver's answers are two flows. Its stream starts at its SYN, or at the first data seen (then
taken to start a message: a gateway started mid-connection may read garbage there, which
dnspython refuses). Segments come in order: a retransmission of bytes already read adds only
what is new; a gap (a segment lost before the gateway, or reordered) ends the stream's
unfinished message, counted as dropped "gap"; the next data starts a new one. FIN and RST end
the stream. Bounded: PER_DEVICE flows of one device (its own least recently used goes first),
MAX_STREAMS flows and MAX_BYTES of unfinished messages in all (the least recently used stream
goes first, "evicted"), and a stream idle for LIFETIME seconds goes ("expired"). A device
opening many connections to a resolver thus pushes out its own streams before the others'.
"""
from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from .wire import FIN, RST, SYN, Segment

MAX_STREAMS = 256             # TCP flows followed at once
PER_DEVICE = 16               # of them, one device's
MAX_BYTES = 4 << 20           # bytes of unfinished messages held in all (a message is at most 65537)
LIFETIME = 10.0               # seconds a stream may wait for its next segment
SEQ = 1 << 32


@dataclass
class Stream:
    next_seq: int             # the sequence number of the next byte expected
    seen: float
    data: bytearray = field(default_factory=bytearray)   # the unfinished message's bytes so far


class Streams:
    def __init__(self, max_streams: int = MAX_STREAMS, max_bytes: int = MAX_BYTES, lifetime: float = LIFETIME,
                 per_device: int = PER_DEVICE):
        self.max_streams, self.max_bytes, self.lifetime = max_streams, max_bytes, lifetime
        self.per_device = per_device
        self.table: OrderedDict[tuple, Stream] = OrderedDict()     # least recently used first
        self.by_device: dict[str, OrderedDict[tuple, None]] = {}  # the same keys, per device
        self.held = 0                                              # bytes of unfinished messages
        self.dropped: Counter = Counter()    # unfinished messages given up, by why: gap, evicted, expired, closed

    def feed(self, seg: Segment, device: str, now: float) -> list[bytes]:
        """The DNS messages SEG completes, in order (none: it only adds to one, or has no data).
        DEVICE: the flow's device end (the source of questions, the destination of answers)."""
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
        data = seg.payload
        if stream is None:
            stream = Stream(seg.seq, now)
        else:
            ahead = (seg.seq - stream.next_seq) % SEQ
            if ahead and ahead < SEQ // 2:                 # bytes missing before this segment
                self._drop(key, "gap")
                stream = Stream(seg.seq, now)
            elif ahead:                                    # starts before the next byte: a retransmission
                old = SEQ - ahead
                if old >= len(data):
                    stream.seen = now
                    self.table.move_to_end(key)
                    self.by_device[key[-1]].move_to_end(key)
                    return []
                data = data[old:]
        self.held -= len(stream.data)
        stream.data += data
        stream.next_seq = (seg.seq + len(seg.payload)) % SEQ
        stream.seen = now
        messages = self._messages(stream)
        self.held += len(stream.data)
        self._keep(key, stream)
        return messages

    @staticmethod
    def _messages(stream: Stream) -> list[bytes]:
        """Whole messages off the front of STREAM's bytes; what remains is unfinished. A length
        of 0 is no DNS message: the bytes are dropped (the stream goes on from the next data)."""
        out, at, data = [], 0, stream.data
        while at + 2 <= len(data):
            (n,) = struct.unpack_from("!H", data, at)
            if n == 0:
                at = len(data)
                break
            if at + 2 + n > len(data):
                break
            out.append(bytes(data[at + 2:at + 2 + n]))
            at += 2 + n
        del data[:at]
        return out

    def _keep(self, key: tuple, stream: Stream) -> None:
        mine = self.by_device.get(key[-1], {})
        while key not in mine and len(mine) >= self.per_device:
            self._drop(next(iter(mine)), "evicted")        # (may remove the device's dict: fetched anew below)
        mine = self.by_device.setdefault(key[-1], OrderedDict())
        self.table[key] = stream
        self.table.move_to_end(key)
        mine[key] = None
        mine.move_to_end(key)
        while len(self.table) > self.max_streams or self.held > self.max_bytes:
            self._drop(next(iter(self.table)), "evicted")

    def _drop(self, key: tuple, why: str) -> None:
        stream = self.table.pop(key, None)
        if stream is None:
            return
        mine = self.by_device[key[-1]]
        del mine[key]
        if not mine:
            del self.by_device[key[-1]]
        if stream.data:
            self.held -= len(stream.data)
            self.dropped[why] += 1

    def _expire(self, now: float) -> None:
        while self.table:
            key, stream = next(iter(self.table.items()))
            if now - stream.seen <= self.lifetime:
                return
            self._drop(key, "expired")

    def __len__(self) -> int:
        return len(self.table)
