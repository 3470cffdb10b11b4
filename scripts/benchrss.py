"""The gateway daemon's memory over many rule changes (issue 15: "gateway RSS after 1,000 rule
changes"). A daemon of its own in a throwaway network namespace (as scripts/benchchanges.py's)
takes a deployment, then N rule changes through its socket: a block rule added and removed in
turn, always under the same name (so the policy, the rule names and the counters' labels are
the same after every pair: what grows is what each build leaves behind). Its RSS
(/proc/PID/status VmRSS) is read after a warm-up of 20 changes and after the N: KiB per change.

    scripts/benchrss.py [N]      (default 1000; the small deployment of scripts/benchgen.py)
"""
from __future__ import annotations

import random
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchchanges import PYTHON, REPO, _wait_socket  # noqa: E402

from control.api import Client  # noqa: E402
from control.files import identities_doc, policy_doc  # noqa: E402

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
    token = secrets.token_hex(3)
    netns, iface = f"ztrss-{token}", f"ztr{token}"
    tmp = Path(tempfile.mkdtemp(prefix="ztrss-"))
    pin_dir = f"/sys/fs/bpf/ztgate-rss-{token}"
    sock, config = str(tmp / "ztgate.sock"), tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "interface": iface, "endpoint": "198.18.0.1:51820", "state_dir": str(tmp / "state"), "socket": sock,
        "flow_log": str(tmp / "flows.log"), "metrics": None, "bpf_pin_dir": pin_dir}))
    subprocess.run(["ip", "netns", "add", netns], check=True)
    daemon = None
    try:
        daemon = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway",
                                   "run", "--config", str(config)], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / "daemon.log", "w"))
        _wait_socket(sock, daemon, 120)
        with Client(sock, timeout=900) as c:
            c.call("policy.apply", policy_text=yaml.safe_dump(policy_doc(dep.policy), sort_keys=False),
                   policy_name="policy.yaml", identities_name="identities.yaml",
                   identities_text=yaml.safe_dump(identities_doc(dep.identities), sort_keys=False))
            for i in range(WARMUP):
                _change(c, i)
            before = rss_kib(daemon.pid)
            log(f"rss: {before} KiB after the deployment and {WARMUP} changes; {changes} more")
            for i in range(changes):
                _change(c, i)
            after = rss_kib(daemon.pid)
        full = (tmp / "daemon.log").read_text().count("falling back to a full build")
        log(f"rss: {after} KiB after {changes} changes ({(after - before) / max(1, changes):+.2f} KiB a change)")
        return {"changes": changes, "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_change": (after - before) / max(1, changes), "full_builds": full}
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait(timeout=30)
        subprocess.run(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway", "teardown",
                        "--config", str(config)], cwd=REPO, capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(pin_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def small_deployment(seed: int = 1):
    """The bench's small deployment, as scripts/bench generates it."""
    import benchgen

    return benchgen.build("small", random.Random(f"{seed}:small"))


if __name__ == "__main__":
    out = run(small_deployment(), int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
              lambda m: print(m, file=sys.stderr, flush=True))
    print(f"gateway RSS: {out['rss_before_kib']} -> {out['rss_after_kib']} KiB over {out['changes']} rule changes "
          f"({out['kib_per_change']:+.2f} KiB a change; {out['full_builds']} full builds)")
