"""The gateway daemon's memory over many rule changes (issue 15: "gateway RSS after 1,000 rule
changes"). A daemon of its own in a throwaway network namespace (scripts/benchgateway.py)
takes a deployment, then N rule changes through its socket: a block rule added and removed in
turn, always under the same name (so the policy, the rule names and the counters' labels are
the same after every pair: what grows is what each build leaves behind). Its RSS
(/proc/PID/status VmRSS) is read after a warm-up of 20 changes and after the N: KiB per change.

    scripts/benchrss.py [N]      (default 1000; the small deployment of scripts/benchgen.py)
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchgateway import apply_args, bench_gateway  # noqa: E402

from control.api import Client  # noqa: E402

WARMUP = 20


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _change(c, i: int) -> None:
    if i % 2 == 0:
        c.call("rule.add", rule={"name": "bench-rss", "precedence": 1_000_000, "action": "block",
                                 "protocols": ["tcp"], "destination": {"cidrs": ["10.99.99.1/32"], "ports": [443]}})
    else:
        c.call("rule.remove", name="bench-rss")


def run(dep, changes: int, log) -> dict:
    with bench_gateway("rss") as gw:
        with Client(gw.sock, timeout=900) as c:
            c.call("policy.apply", **apply_args(dep))
            for i in range(WARMUP):
                _change(c, i)
            before = rss_kib(gw.daemon.pid)
            log(f"rss: {before} KiB after the deployment and {WARMUP} changes; {changes} more")
            for i in range(changes):
                _change(c, i)
            after = rss_kib(gw.daemon.pid)
        full = gw.full_builds()
        log(f"rss: {after} KiB after {changes} changes ({(after - before) / max(1, changes):+.2f} KiB a change)")
        return {"changes": changes, "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_change": (after - before) / max(1, changes), "full_builds": full}


def small_deployment(seed: int = 1):
    """The bench's small deployment, as scripts/bench generates it."""
    import benchgen

    return benchgen.build("small", random.Random(f"{seed}:small"))


if __name__ == "__main__":
    out = run(small_deployment(), int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
              lambda m: print(m, file=sys.stderr, flush=True))
    print(f"gateway RSS: {out['rss_before_kib']} -> {out['rss_after_kib']} KiB over {out['changes']} rule changes "
          f"({out['kib_per_change']:+.2f} KiB a change; {out['full_builds']} full builds)")
