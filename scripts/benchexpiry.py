"""Session expiry, timed with real traffic: a device enrolled by login keeps a UDP flow open (an
echo every 0.5 ms, each stamped with the wall clock when sent) while its session runs out;
the time from the session's end (`session_expires`, which the gateway's clock acts on with
no packet or poll) to the first packet sent from then on that gets no echo (nor any after
it) is measured. Then the session is
renewed, and the flow must come back, N times.

Runs its own gateway in namespaces of its own (the site of tests/net/test_gateway.py: no lab,
no lock), as root:  scripts/benchexpiry.py [N]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

import benchecho  # noqa: E402

SESSION_SECONDS = 2


def one(site, key: str, login) -> float:
    """Seconds from a session's end to the first unanswered packet of the device's open flow."""
    from tests.net.test_gateway import PYTHON
    expires = login(site, key, SESSION_SECONDS)["session_expires"]
    # the wall clock (session_expires is unix time); the gateway tests' echo prefixes 5 bytes
    sender = site.ns.popen("dev", PYTHON, *benchecho.argv(SESSION_SECONDS + 1.0, wall_clock=True, seq_at=5),
                           stdout=subprocess.PIPE, text=True)
    out, _ = sender.communicate(timeout=60)
    packets = json.loads(out)
    if not packets[0][1]:
        raise RuntimeError("the device's flow was not answered before its session ended")
    last_ok = max(i for i, (_, ok) in enumerate(packets) if ok)
    if last_ok == len(packets) - 1:
        raise RuntimeError("the device's flow was not cut at its session's end")
    # A packet sent just before the end whose echo came back after it is dropped too (on the way
    # back): it says nothing of how late the cut was, so the count starts at the end.
    first_after = next(t for t, _ in packets if t >= expires * 1e9)
    return max(packets[last_ok + 1][0], first_after) / 1e9 - expires


def run(repeats: int, log) -> dict:
    from control import wireguard
    from tests.net.test_gateway import APP_RDP, APP_WEB, LAB, PYTHON, SERVERS, Site
    from tests.net.test_sessions import login
    from tests.netns import Namespaces

    with tempfile.TemporaryDirectory(prefix="ztgate-benchexpiry-") as tmp, Namespaces("ztbx") as ns:
        os.chmod(tmp, 0o755)
        for name in ("gw", "dev", "app"):
            ns.add(name)
        ns.veth("gw", "dev", "198.18.0.1/24", "198.18.0.11/24")
        _, app_if = ns.veth("gw", "app", "10.20.0.1/24", f"{APP_WEB}/24")
        ns.run("app", "ip", "addr", "add", f"{APP_RDP}/24", "dev", app_if)
        ns.run("app", "ip", "route", "add", "default", "via", "10.20.0.1")
        ns.run("gw", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        servers = ns.popen("app", PYTHON, "-c", SERVERS, stdout=subprocess.PIPE, text=True)
        site = Site(ns, Path(tmp))
        try:
            servers.stdout.readline()
            site.start()
            site.ztgate("policy", "apply", LAB / "policy.yaml")
            private, public = wireguard.generate_keypair()
            got = login(site, public, 3600)
            conf = Path(tmp) / f"{ns.ifname('bx')}.conf"
            conf.write_text(got["config"].replace("[Interface]\n", f"[Interface]\nPrivateKey = {private}\n", 1))
            conf.chmod(0o600)
            ns.run("dev", "wg-quick", "up", conf, env=dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION="wireguard-go"))
            lags = []
            for i in range(repeats):
                lags.append(one(site, public, login))
                log(f"expiry #{i + 1}: first dropped packet {lags[-1] * 1000:+.1f} ms after the session's end")
            return {"expiry_to_drop_s": lags}
        finally:
            if site.daemon and site.daemon.poll() is None:
                site.daemon.terminate()
                site.daemon.wait(timeout=10)
            ns.run("gw", PYTHON, "-m", "control.cli", "gateway", "teardown", "--config", site.config, cwd=REPO,
                   check=False, timeout=30)
            subprocess.run(["rm", "-rf", site.pin_dir])
            servers.kill()


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 (nearest rank: of few samples, p99 is the largest)."""
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


if __name__ == "__main__":
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 10, lambda m: print(m, file=sys.stderr))
    p50, p99 = percentiles(result["expiry_to_drop_s"])
    print(f"session expiry -> first dropped packet of an open flow: p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms of {len(result['expiry_to_drop_s'])} (goal <= 100 ms)")
