"""Request-to-kernel time of changes at the large scale, through the real gateway daemon.

The daemon runs in a throwaway network namespace with its own WireGuard interface, pin
directory and state; the large deployment is applied through the socket; then one-rule,
one-device and one-membership changes are timed from the request to the reply. The gateway
replies after the kernel holds the change (control/gateway/core.py applies before it answers), so
the reply time is the request-to-kernel time. After each change one packet is traced through
the attached program and must agree with the reference. Everything is removed afterwards.
"""
from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from control.api import Client
from control.files import identities_doc, policy_doc
from control.wireguard import generate_keypair

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the gateway daemon exited during start-up")
        try:
            with Client(path) as c:
                c.call("status")
                return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("the gateway daemon did not start")


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(dep, repeats: int, log) -> dict:
    token = secrets.token_hex(3)
    netns, iface = f"ztbench-{token}", f"ztb{token}"
    tmp = Path(tempfile.mkdtemp(prefix="ztbench-"))
    pin_dir = f"/sys/fs/bpf/ztgate-bench-{token}"
    sock = str(tmp / "ztgate.sock")
    config = tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "interface": iface, "endpoint": "198.18.0.1:51820", "state_dir": str(tmp / "state"), "socket": sock,
        "flow_log": str(tmp / "flows.log"), "metrics": None, "bpf_pin_dir": pin_dir}))
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy_doc(dep.policy), sort_keys=False))
    (tmp / "identities.yaml").write_text(yaml.safe_dump(identities_doc(dep.identities), sort_keys=False))
    subprocess.run(["ip", "netns", "add", netns], check=True)
    daemon = None
    try:
        daemon = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway",
                                   "run", "--config", str(config)], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / "daemon.log", "w"))
        _wait_socket(sock, daemon, 120)
        out: dict = {}
        with Client(sock, timeout=900) as c:
            log("gateway: applying the large deployment through the socket")
            out["apply_all_s"] = _timed(lambda: c.call(
                "policy.apply", policy_text=(tmp / "policy.yaml").read_text(), policy_name="policy.yaml",
                identities_text=(tmp / "identities.yaml").read_text(), identities_name="identities.yaml"))
            users = [u for u in dep.identities.users if dep.devices_of.get(u.key)]
            dst = "10.99.99.1"

            def rule_change(i: int) -> None:
                c.call("rule.add", rule={"name": f"bench-{i}", "precedence": 1 + i, "action": "block",
                                         "principals": [f"user:{users[i].key}"], "protocols": ["tcp"],
                                         "destination": {"cidrs": [f"{dst}/32"], "ports": [443]}})

            def device_add(i: int) -> None:
                c.call("device.add", name=f"bench-dev-{i}", email=users[i].email, public_key=generate_keypair()[1])

            def member_add(i: int) -> None:
                c.call("group.member", group=f"bench-group-{i}", email=users[i].email, present=True)

            def device_disable(i: int) -> None:
                c.call("device.set_enabled", name=f"bench-dev-{i}", enabled=False)

            def agrees(i: int) -> bool:
                t = c.call("trace", packet={"user": users[i].email, "dst": dst, "proto": "tcp", "dport": 443})
                return (t["kernel"]["verdict"], t["kernel"]["rule"]) == (t["reference"]["verdict"], t["reference"]["rule"])

            for name, fn in (("rule add (full build)", rule_change), ("device add", device_add),
                             ("group member add", member_add), ("device disable", device_disable)):
                times = []
                for i in range(repeats):
                    times.append(_timed(lambda: fn(i)))
                    if not agrees(i):
                        raise RuntimeError(f"after {name} #{i} the kernel disagrees with the reference")
                out[name] = times
                log(f"gateway: {name}: median {statistics.median(times):.3f} s of {repeats}")
            out["build"] = c.call("status")["tables"]
        return out
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait(timeout=30)
        subprocess.run(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway", "teardown",
                        "--config", str(config)], cwd=REPO, capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(pin_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
