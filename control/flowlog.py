"""Flow events: from the kernel's ring buffer to JSON lines in a size-rotated log file, and
back out for `ztgate logs`.

The kernel writes an event for each drop and each new allowed flow, rate-limited on its side
(it counts what it did not emit); this pump only reads, names and writes, so the data plane
never waits for it. Names come from the build that made the decision (events carry its
number): a rule renamed or a device removed a moment later is still named as it was. An
allow that a learned name decided (a rule by hostname) also names that hostname: the event
carries the rule's name token, read with that build's tokens against what is learned now.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from dataplane.events import EventReader
from dataplane.reasons import Verdict

from .model import fold
from .protocols import PORTED, name_of

log = logging.getLogger("ztgate.flowlog")
TAIL_BYTES = 8 << 20          # how far back `ztgate logs` looks in the current file


def _writer(path: Path, max_bytes: int, backups: int) -> logging.Logger:
    # The flow log says who reached what: root and the ztgate group only (the daemon's umask
    # keeps rotated files so; a log left readable by an older version is closed here).
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))
    os.chmod(path, os.stat(path).st_mode & 0o750)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    out = logging.getLogger(f"ztgate.flows.{path}")
    out.propagate = False
    out.handlers[:] = [handler]
    out.setLevel(logging.INFO)
    return out


class FlowLog:
    def __init__(self, config, gateway):
        self.config, self.gateway = config, gateway
        self.path = Path(config.flow_log)
        self.out = _writer(self.path, config.flow_log_max_bytes, config.flow_log_backups)
        self.written = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # ktime (CLOCK_MONOTONIC) -> wall clock
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._pump, name="flow-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _pump(self) -> None:
        reader = EventReader.pinned(self.config.bpf_pin_dir)
        try:
            while not self._stop.is_set():
                for event in reader.poll(200):
                    try:
                        self.out.info(json.dumps(self.line(event)))
                        self.written += 1
                    except Exception:
                        log.exception("could not write a flow event")
        finally:
            reader.close()

    def line(self, e) -> dict:
        kernel = self.gateway.kernel
        device = kernel.device_name(e.build, e.device)
        when = datetime.fromtimestamp((e.time_ns + self._offset_ns) / 1e9, timezone.utc)
        ports = e.proto in PORTED
        return {
            "time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "user": self.gateway.owner.get(device) if device else None,
            "device": device,
            "src": str(e.src), "dst": str(e.dst),
            "proto": name_of(e.proto),
            "sport": e.sport if ports else None, "dport": e.dport if ports else None,
            "verdict": e.verdict.label, "rule": kernel.rule_name(e.build, e.rule), **self._hostname(e),
            "reason": e.reason.label, "bytes": e.length,
        }

    def _hostname(self, e) -> dict:
        """{"hostname": NAME} for an allow a learned name decided; {} otherwise (and when the
        address has expired since, or the build is no longer kept)."""
        if not e.name or e.verdict is not Verdict.ALLOW:
            return {}
        name = self.gateway.kernel.hostname(e.name, e.dst, e.build)
        return {"hostname": name} if name else {}


def read_events(path: Path, cursor: Optional[list], user: Optional[str], verdict: Optional[str],
                device: Optional[str], limit: int) -> dict:
    """Events of the current log file that match, and a cursor to ask for what comes after.
    Without a cursor: the last `limit`. With one: what was written since (at most `limit`)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"events": [], "cursor": [0, 0]}
    start = max(0, st.st_size - TAIL_BYTES)
    if cursor and len(cursor) == 2 and cursor[0] == st.st_ino and 0 <= cursor[1] <= st.st_size:
        start = cursor[1]
    elif cursor:
        start = 0              # the file was rotated since: read the new one from its start
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(TAIL_BYTES)
    end = data.rfind(b"\n") + 1          # a line being written is read next time
    out, pos, next_start = [], 0, start + end
    for raw in data[:end].split(b"\n")[:-1]:
        line_start, pos = pos, pos + len(raw) + 1
        if start and not cursor and line_start == 0:
            continue                     # the first line of a tail may be cut
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if user and fold(ev.get("user") or "") != fold(user):
            continue
        if verdict and ev.get("verdict") != verdict:
            continue
        if device and ev.get("device") != device:
            continue
        if cursor and len(out) == limit:
            next_start = start + line_start   # follow mode: the rest on the next call
            break
        out.append(ev)
    return {"events": out[-limit:], "cursor": [st.st_ino, next_start]}
