"""Request-to-kernel time of changes at one scale, through the real gateway daemon.

The daemon runs in a throwaway network namespace with its own WireGuard interface, pin
directory and state; the deployment is applied through the socket; then N changes of each
kind (rule add, disable, enable, move, remove; device add, group member add, device disable)
are timed from the request to the reply: p50 and p99 of each kind. The gateway
replies after the kernel holds the change (control/gateway/core.py applies before it answers), so
the reply time is the request-to-kernel time. After each change one packet is traced through
the attached program and must agree with the reference. Everything is removed afterwards.
"""
from __future__ import annotations

import time

from benchgateway import apply_args, bench_gateway
from benchgateway import PYTHON, REPO, wait_socket as _wait_socket  # noqa: F401 (other scripts import them from here)
from control.api import Client
from control.wireguard import generate_keypair


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def percentile(values: list, q: float) -> float:
    """The q-th percentile, nearest rank (of 50 values, p99 is the largest)."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, -(-len(ranked) * q // 100) - 1))] if ranked else float("nan")


def _changes(c, user, dst: str, top: int) -> dict:
    """Each kind of change, as a function of its index i (rule changes act on rule bench-i)."""
    return {
        "rule add": lambda i: c.call("rule.add", rule={
            "name": f"bench-{i}", "precedence": top + i, "action": "block", "principals": [f"user:{user(i).key}"],
            "protocols": ["tcp"], "destination": {"cidrs": [f"{dst}/32"], "ports": [443]}}),
        "rule disable": lambda i: c.call("rule.set_enabled", name=f"bench-{i}", enabled=False),
        "rule enable": lambda i: c.call("rule.set_enabled", name=f"bench-{i}", enabled=True),
        "rule move": lambda i: c.call("rule.move", name=f"bench-{i}", precedence=top + 100_000 + i),
        "rule remove": lambda i: c.call("rule.remove", name=f"bench-{i}"),
        "device add": lambda i: c.call("device.add", name=f"bench-dev-{i}", email=user(i).email,
                                       public_key=generate_keypair()[1]),
        "group member add": lambda i: c.call("group.member", group=f"bench-group-{i}", email=user(i).email,
                                             present=True),
        "device disable": lambda i: c.call("device.set_enabled", name=f"bench-dev-{i}", enabled=False),
    }


def run(dep, repeats: int, log, scale: str = "large") -> dict:
    with bench_gateway("bench") as gw:
        out: dict = {}
        with Client(gw.sock, timeout=900) as c:
            log(f"gateway ({scale}): applying the deployment through the socket")
            whole = apply_args(dep)
            out["apply_all_s"] = _timed(lambda: c.call("policy.apply", **whole))
            users = [u for u in dep.identities.users if dep.devices_of.get(u.key)]
            dst = "10.99.99.1"
            top = max((r.precedence for r in dep.policy.rules), default=0) + 1000

            def user(i: int):
                return users[i % len(users)]

            def agrees(i: int) -> bool:
                t = c.call("trace", packet={"user": user(i).email, "dst": dst, "proto": "tcp", "dport": 443})
                return (t["kernel"]["verdict"], t["kernel"]["rule"]) == (t["reference"]["verdict"], t["reference"]["rule"])

            for name, fn in _changes(c, user, dst, top).items():
                times = []
                for i in range(repeats):
                    times.append(_timed(lambda: fn(i)))
                    if not agrees(i):
                        raise RuntimeError(f"after {name} #{i} the kernel disagrees with the reference")
                out[name] = times
                log(f"gateway ({scale}): {name}: p50 {percentile(times, 50) * 1000:.1f} ms, "
                    f"p99 {percentile(times, 99) * 1000:.1f} ms of {repeats}")
            out["full_builds"] = gw.full_builds()
            out["build"] = c.call("status")["tables"]
        return out
