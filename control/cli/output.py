"""What every gateway verb shares: one request over the socket (control/api.py), and the
printing: JSON, aligned columns, key-values, handshake ages and byte sizes."""
from __future__ import annotations

import json
import re
import time

from ..api import Client


# Control and formatting characters that act on a terminal (escape sequences, bells, C1
# controls, bidirectional overrides, invisible marks); newline and tab are the CLI's own.
UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e"
                         "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]")


class Printable:
    """A text stream that writes every unprintable character as its \\x, \\u escape: what the
    CLI prints (names, emails, groups, audit details) may come from another operator or from
    an older store, and must not drive the reader's terminal."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text))

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def call(args, op: str, **kw):
    with Client(args.socket) as client:
        return client.call(op, **kw)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=None if isinstance(obj, list) else 2, default=str))


def table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Aligned columns: (key, header) pairs; None prints as '-'."""
    cells = [[h.upper() for _, h in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else str(row.get(k)) for k, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def keyvalues(pairs: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{k:<{width}}  {'-' if v is None else v}")


def ago(ts) -> str:
    if not ts:
        return "never"
    s = int(time.time() - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def done(args, result: dict, what: str) -> int:
    if getattr(args, "json", False):
        print_json(result)
    elif result.get("unchanged"):
        print(f"{what}: nothing to change (generation {result['generation']})")
    else:
        print(f"{what} (generation {result['generation']})")
    return 0
