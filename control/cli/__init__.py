"""`ztgate`: one command, nouns and verbs (spec/CLI.md). The only place that prints errors
and chooses exit statuses: 0 success, 1 failure at run time, 2 bad input (nothing changed).

parser.py     every verb, its flags, help and examples
offline.py    verbs on files alone: explain, dataplane verdicts, policy check
changes.py    verbs that change (or show) the running gateway: policy, rules, users, groups,
              devices, connectors, routes; gateway run/teardown; lab
watch.py      verbs that watch it: logs, flows (and flows kill), trace, status, audit
output.py     talking to the socket and printing: tables, key-values, durations, sizes
"""
from __future__ import annotations

import sys
from typing import Optional

from ..errors import ZtError
from .output import Printable
from .parser import build_parser


def main(argv: Optional[list[str]] = None) -> int:
    if not isinstance(sys.stdout, Printable):
        sys.stdout, sys.stderr = Printable(sys.stdout), Printable(sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ZtError as e:
        print(f"ztgate: {e}", file=sys.stderr)
        return e.exit_status
    except BrokenPipeError:
        return 1
