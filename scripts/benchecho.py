"""One UDP flow kept open, for the benches that time when a flow is cut (scripts/benchrevoke.py,
benchscim.py, benchexpiry.py): run inside the device's namespace, it sends a numbered datagram
over one socket every 0.5 ms to the lab's echo service, notes which were echoed, and prints one
JSON line at the end: [[sent ns, answered], ...], in the order sent.

Each bench reads the flow with its own clock and against its own echo server:
  --wall-clock     stamp with time.time_ns() (the flow log's clock) instead of time.monotonic_ns()
  --seq-at N       the echo carries the sequence number at byte N (the gateway tests' server
                   puts a 5-byte prefix before it)
  --wait-answer    send until the first echo, print "up", then run SECONDS more (gives up after
                   20,000 unanswered datagrams)
  --drain S        after the last send, wait S seconds and take the echoes still on their way

    python scripts/benchecho.py SECONDS [options]
"""
from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

ECHO = ("10.20.0.10", 5353)      # the lab's echo service (app, udp 5353)
POLL_S = 0.0005                   # the wait for echoes between two sends
GIVE_UP_UNANSWERED = 20000


def argv(seconds: float, wall_clock: bool = False, seq_at: int = 0, wait_answer: bool = False,
         drain: float = 0.0) -> list[str]:
    """The arguments after the interpreter that run this sender with these settings."""
    return [str(Path(__file__).resolve()), str(seconds), "--seq-at", str(seq_at), "--drain", str(drain),
            *(["--wall-clock"] if wall_clock else []), *(["--wait-answer"] if wait_answer else [])]


def keep_flow(seconds: float, wall_clock: bool, seq_at: int, wait_answer: bool, drain: float) -> list:
    clock = time.time_ns if wall_clock else time.monotonic_ns
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(ECHO)
    s.setblocking(False)
    sent, answered = [], set()

    def take() -> None:
        answered.add(int.from_bytes(s.recv(64)[seq_at:seq_at + 4], "big"))

    end = None if wait_answer else time.monotonic() + seconds
    seq = 0
    while end is None or time.monotonic() < end:
        sent.append(clock())
        s.send(seq.to_bytes(4, "big"))
        seq += 1
        deadline = time.monotonic() + POLL_S
        while time.monotonic() < deadline:
            try:
                take()
            except BlockingIOError:
                pass
        if end is None and answered:
            end = time.monotonic() + seconds
            print("up", flush=True)
        if end is None and len(sent) > GIVE_UP_UNANSWERED:
            break
    if drain:
        time.sleep(drain)
        while True:
            try:
                take()
            except BlockingIOError:
                break
    return [[t, i in answered] for i, t in enumerate(sent)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seconds", type=float)
    ap.add_argument("--wall-clock", action="store_true")
    ap.add_argument("--seq-at", type=int, default=0)
    ap.add_argument("--wait-answer", action="store_true")
    ap.add_argument("--drain", type=float, default=0.0)
    a = ap.parse_args()
    print(json.dumps(keep_flow(a.seconds, a.wall_clock, a.seq_at, a.wait_answer, a.drain)), flush=True)


if __name__ == "__main__":
    main()
