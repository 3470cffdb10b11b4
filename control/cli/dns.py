"""`ztgate dns list`: the names the gateway learned from its resolvers' answers."""
from __future__ import annotations

import time
from datetime import datetime, timezone

from .output import call, print_json, table


def cmd_dns_list(args) -> int:
    result = call(args, "dns.list", name=args.name)
    if args.json:
        print_json(result)
        return 0
    if not result["enabled"]:
        print("the DNS slow path is off (no `dns: resolvers:` in the gateway config, or it could not start: "
              "see the gateway log); hostname rules allow nothing")
    now = time.time()
    rows = [dict(r, expires=datetime.fromtimestamp(r["expires"], timezone.utc).strftime("%H:%M:%S") +
                 f" (in {max(0, int(r['expires'] - now))}s)") for r in result["learned"]]
    table(rows, [("name", "name"), ("address", "address"), ("expires", "expires"), ("asker", "asked by")])
    c = result["counters"]
    if c:
        refused = ", ".join(f"{k} {v}" for k, v in sorted(c["refused"].items())) or "none"
        print(f"\nanswers: {c['queued']} queued, {c['learned']} learned, {c['late']} released late; "
              f"refused: {refused}; questions outstanding: {c['outstanding']}")
    return 0
