"""Revocation of open flows, timed on the lab with real traffic: alice keeps a UDP flow open
(an echo every 0.5 ms, each stamped with when it was sent), a block rule for that flow is
added through the CLI, and the time from the CLI starting (and returning) to the first packet
that gets no echo is measured. Negative from the return: the kernel dropped before the CLI
returned (the gateway applies a change before it answers, then frees the old build).

The echo's clock is the sender's: a packet's send time, not when it reached the gateway. On
a loaded host wireguard-go queues the tunnel by tens of milliseconds, so the echo figure can
even come out before the CLI started. The flow log's row is the kernel's own: the time of the
first drop by the block rule (the event's CLOCK_MONOTONIC stamp, on the wall clock in the
log), from the CLI's start. Then the rule is removed and the flow must come back.

Uses the lab (`ztgate lab up`); a lab that was not up is taken down again afterwards.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import benchecho

REPO = Path(__file__).resolve().parent.parent
ZTGATE = str(REPO / ".venv" / "bin" / "ztgate")
PYTHON = str(REPO / ".venv" / "bin" / "python")
FLOW_LOG = Path("/run/ztgate-lab/flows.log")     # the lab gateway's (lab/lab.py)
RULE = "bench-revoke"

def _zt(*args: str) -> None:
    subprocess.run([ZTGATE, *args], check=True, capture_output=True, text=True, timeout=120)


def first_drop_s(started_wall_ns: int):
    """Seconds from STARTED_WALL_NS to the block rule's first drop in the flow log, or None."""
    if not FLOW_LOG.exists():
        return None
    for line in FLOW_LOG.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("rule") == RULE and e.get("verdict") == "block":
            at = datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()
            if at * 1e9 >= started_wall_ns - 1e6:    # (µs in the log: a 1 ms margin for rounding)
                return at - started_wall_ns / 1e9
    return None


def one(log) -> tuple[float, float, float]:
    """Seconds from the CLI starting, and from it returning, to the first unanswered packet of
    alice's open flow; and from the CLI starting to the kernel's first drop (flow log)."""
    # alice's flow for 6 s, on the monotonic clock; the echoes still on their way are taken at the end
    sender = subprocess.Popen(["nsenter", "--net=/run/netns/zt-alice", PYTHON, *benchecho.argv(6, drain=0.3)],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    try:
        started_wall = time.time_ns()
        started = time.monotonic_ns()
        _zt("rule", "add", RULE, "--action", "block", "--principal", "user:alice@example.com",
            "--proto", "udp", "--dst-cidr", "10.20.0.10/32", "--dst-port", "5353", "--precedence", "1")
        returned = time.monotonic_ns()
        out, _ = sender.communicate(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
        dropped = None
        deadline = time.monotonic() + 3        # the flow log is written by the daemon's pump
        while dropped is None and time.monotonic() < deadline:
            dropped = first_drop_s(started_wall)
            time.sleep(0.05)
        subprocess.run([ZTGATE, "rule", "remove", RULE], capture_output=True, timeout=120)
    packets = json.loads(out)
    if not packets[0][1]:
        raise RuntimeError("alice's flow was not answered before the revocation: is the lab healthy?")
    last_ok = max(i for i, (_, ok) in enumerate(packets) if ok)
    if last_ok == len(packets) - 1 or any(ok for _, ok in packets[last_ok + 1:]):
        raise RuntimeError("alice's flow was not cut by the block rule")
    if dropped is None:
        raise RuntimeError(f"no drop by {RULE} in {FLOW_LOG}")
    first_dropped = packets[last_ok + 1][0]
    return (first_dropped - started) / 1e9, (first_dropped - returned) / 1e9, dropped


def run(repeats: int, log) -> dict:
    was_up = subprocess.run([ZTGATE, "lab", "status"], capture_output=True).returncode == 0
    if not was_up:
        log("revocation: bringing the lab up")
        subprocess.run([ZTGATE, "lab", "up"], check=True, capture_output=True, timeout=300)
    try:
        from_start, from_return, kernel = [], [], []
        for i in range(repeats):
            a, b, c = one(log)
            from_start.append(a)
            from_return.append(b)
            kernel.append(c)
            log(f"revocation #{i + 1}: the kernel's first drop {c * 1000:.0f} ms after the CLI started "
                f"(flow log); first unanswered echo {a * 1000:+.0f} ms after it started, "
                f"{b * 1000:+.0f} ms after it returned")
            time.sleep(1.0)
        return {"revocation_kernel_from_start_s": kernel, "revocation_from_start_s": from_start,
                "revocation_from_return_s": from_return}
    finally:
        if not was_up:
            subprocess.run([ZTGATE, "lab", "down"], capture_output=True, timeout=300)


if __name__ == "__main__":
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 3, lambda m: print(m, file=sys.stderr))
    for key, values in result.items():
        print(f"{key}: median {statistics.median(values) * 1000:+.0f} ms of {len(values)}")
