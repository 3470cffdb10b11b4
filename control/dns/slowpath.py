"""The DNS slow path's thread: reads the NFQUEUE, remembers the devices' questions, learns
what the resolvers' answers teach (written into the kernel by LEARN), and only then releases
each answer, so the device's first connection to the name is decided with what it taught.

Every queued packet is released (accepted), whatever it holds: the slow path never drops
DNS, it only learns or does not. Nothing here can stop the thread: an exception while
handling one packet is logged and counted, and the packet released.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from collections import Counter, deque
from typing import Callable, Optional

from .failopen import set_fail_open
from .messages import Refused, read_answer, read_question, teachings
from .questions import Questions
from .settings import DnsConfig
from .streams import Streams
from .wire import read_segment, dns_messages

log = logging.getLogger("ztgate.dns")
LATE_SECONDS = 0.005          # an answer held longer than this is counted as released late
SAMPLES = 4096                # hold times kept for `ztgate dns` and the bench


class Counters:
    def __init__(self):
        self.questions = 0        # devices' questions remembered
        self.queued = 0           # resolvers' answers that came through the queue
        self.learned = 0          # answers that taught at least one address
        self.refused: Counter = Counter()     # answers (and questions) that taught nothing, by why
        self.late = 0             # answers released later than LATE_SECONDS after they arrived
        self.pairs_over_cap = 0   # (name, address) pairs of answers beyond what one answer teaches
        self.holds: deque = deque(maxlen=SAMPLES)     # seconds each answer was held
        # the slow path's thread writes, `ztgate dns` and the metrics read from others: the
        # Counter and the deque change under this lock and are copied under it (copy())
        self.lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def refuse(self, why: str, n: int = 1) -> None:
        with self.lock:
            self.refused[why] += n

    def held(self, seconds: float) -> None:
        with self.lock:
            self.holds.append(seconds)
            self.late += seconds > LATE_SECONDS

    def copy(self) -> dict:
        with self.lock:
            return {"questions": self.questions, "queued": self.queued, "learned": self.learned,
                    "late": self.late, "refused": dict(self.refused), "pairs_over_cap": self.pairs_over_cap,
                    "holds": list(self.holds)}


class SlowPath:
    """learn([(name, address, ttl)...], asker): write what one answer taught into the kernel
    (the gateway's), return how many pairs were kept, or raise Refused(why) when it keeps
    nothing for a reason of its own; asker_of(address): the device that has that tunnel
    address, by name."""

    def __init__(self, dns: DnsConfig, interface: str, learn: Callable, asker_of: Callable[[str], str]):
        self.dns, self.interface = dns, interface
        self.learn, self.asker_of = learn, asker_of
        self.resolvers = {str(r) for r in dns.resolvers}
        self.questions = Questions(per_device=dns.questions_per_device)
        self.streams = Streams()              # DNS over TCP, across segments
        self.counters = Counters()
        self.lock = threading.Lock()          # one packet at a time: the thread, or a caller of handle()
        self.queue = None
        self.thread: Optional[threading.Thread] = None
        self.stopping = threading.Event()

    # ---------------------------------------------------------------------------------------
    # one packet

    def handle(self, payload: bytes, now: Optional[float] = None) -> str:
        """Handle one queued packet's bytes; say what it was (for tests and the log)."""
        with self.lock:
            seg = read_segment(payload)
            if seg is None:
                return "unreadable"
            # the device: the question's source, the answer's destination, by name (its
            # addresses share its limits)
            if seg.dport == 53 and str(seg.dst) in self.resolvers:
                return self._question(seg, now, self.asker_of(str(seg.src)))
            if seg.sport == 53 and str(seg.src) in self.resolvers:
                return self._answer(seg, now, self.asker_of(str(seg.dst)))
            return "other"

    def _messages(self, seg, now, device: str) -> tuple[list[bytes], bool]:
        """The DNS messages SEG carries whole, or completes (TCP: streams.py); and whether its
        data went unread (a TCP flow not followed: no SYN seen)."""
        if seg.transport == "udp":
            return dns_messages(seg), False
        now = time.monotonic() if now is None else now
        messages = self.streams.feed(seg, device, now)
        unfollowed = "unfollowed" in self.streams.dropped
        for why, n in self.streams.dropped.items():    # messages and data given up: counted once
            self.counters.refuse(f"tcp-{why}", n)
        self.streams.dropped.clear()
        return messages, unfollowed

    def _question(self, seg, now, device: str) -> str:
        messages, unfollowed = self._messages(seg, now, device)
        said = "unfollowed" if unfollowed else "no-message"
        for wire in messages:
            try:
                q = read_question(wire)
            except Refused as e:
                said = f"question-refused:{e}"
                continue
            self.questions.asked(Questions.key(seg.src, seg.sport, seg.dst, seg.transport, q.id), q, now, device)
            self.counters.add("questions")
            said = "question"
        return said

    def _answer(self, seg, now, device: str) -> str:
        messages, unfollowed = self._messages(seg, now, device)
        if not messages:
            # TCP data of a message not finished yet (held in streams.py, released), of a flow
            # not followed, or a bare TCP segment (SYN, ACK, FIN)
            return "unfollowed" if unfollowed else "held" if seg.payload else "no-message"
        said = "answer"
        for wire in messages:
            self.counters.add("queued")
            try:
                said = self._learn_from(seg, wire, now, device)
                self.counters.add("learned")
            except Refused as e:
                self.counters.refuse(str(e))
                said = f"refused:{e}"
        return said

    def _learn_from(self, seg, wire: bytes, now, asker: str) -> str:
        question, msg = read_answer(wire)
        key = Questions.key(seg.dst, seg.dport, seg.src, seg.transport, question.id)
        if not self.questions.answered(key, question, now):
            raise Refused("unasked")
        taught = teachings(question, msg)
        self.counters.add("pairs_over_cap", taught.over)
        if not taught:
            raise Refused("no-address")
        try:
            kept = self.learn([(t.name, t.address, self.dns.clamp(t.ttl)) for t in taught], asker)
        except Refused:               # LEARN says why nothing was kept (e.g. "unnamed")
            raise
        except Exception as e:        # the kernel refused it: released all the same, unlearned
            log.warning("learning %s (asked by %s): %s", ", ".join(f"{t.name} {t.address}" for t in taught), asker, e)
            raise Refused("not-learned") from e
        if kept == 0:
            raise Refused("over-bounds")          # the learned table is full (dns: max_* bounds)
        return "learned"

    # ---------------------------------------------------------------------------------------
    # the queue

    def _on_packet(self, pkt) -> None:
        start = time.monotonic()
        said = "error"
        try:
            said = self.handle(pkt.get_payload())
        except Exception:
            log.exception("DNS slow path: a packet could not be handled (released unlearned)")
            self.counters.refuse("error")
        finally:
            pkt.accept()
        if said.startswith(("learned", "refused", "answer")):
            self.counters.held(time.monotonic() - start)

    def start(self) -> None:
        """Bind the queue (before the rules exist, so nothing waits on an unread queue), then
        install the rules, then read."""
        from netfilterqueue import NetfilterQueue
        from . import netfilter

        self.queue = NetfilterQueue()
        self.queue.bind(self.dns.queue, self._on_packet, max_len=self.dns.queue_length)
        try:
            # a full queue (or a reader held, e.g. by a swap holding the learned lock) then
            # lets answers pass unlearned instead of dropping them: before the rules exist
            set_fail_open(self.queue.get_fd(), self.dns.queue)
            netfilter.install(self.interface, self.dns.resolvers, self.dns.queue)
        except BaseException:
            self.queue.unbind()
            self.queue = None
            raise
        self.stopping.clear()
        self.thread = threading.Thread(target=self._run, name="ztgate-dns", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fd = self.queue.get_fd()
        while not self.stopping.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.5)
                if ready:
                    self.queue.run(block=False)
            except Exception:
                log.exception("DNS slow path: reading the queue (going on)")
                time.sleep(0.1)

    def stop(self) -> None:
        """Rules first (answers then pass unqueued), then the queue."""
        from . import netfilter

        netfilter.remove(self.interface)
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.queue is not None:
            self.queue.unbind()
            self.queue = None

    def snapshot(self) -> dict:
        out = self.counters.copy()
        del out["holds"]
        return {**out, "outstanding": len(self.questions), "tcp_streams": len(self.streams)}
