"""A gateway daemon of the bench's own, for the legs that time it through its socket
(scripts/benchchanges.py, benchrss.py): it runs in a throwaway network namespace with its own
WireGuard interface, pin directory, state and socket, and everything goes afterwards (also
when the leg fails).
"""
from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from control.api import Client
from control.files import identities_doc, policy_doc

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")


@dataclass
class BenchGateway:
    sock: str                   # its API socket
    daemon: subprocess.Popen
    log: Path                   # its stderr

    def full_builds(self) -> int:
        """How many changes fell back to a whole build (the daemon logs each)."""
        return self.log.read_text().count("falling back to a full build")


def gateway_files(name: str) -> tuple[str, Path, str, str, Path]:
    """A throwaway gateway's namespace name, directory, pin directory, socket and config (written):
    zt{name}-<token> (namespace), zt<n><token> (interface), /sys/fs/bpf/ztgate-{name}-<token> (pins)."""
    token = secrets.token_hex(3)
    netns, iface = f"zt{name}-{token}", f"zt{name[0]}{token}"
    tmp = Path(tempfile.mkdtemp(prefix=f"zt{name}-"))
    pin_dir = f"/sys/fs/bpf/ztgate-{name}-{token}"
    sock, config = str(tmp / "ztgate.sock"), tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "interface": iface, "endpoint": "198.18.0.1:51820", "state_dir": str(tmp / "state"), "socket": sock,
        "flow_log": str(tmp / "flows.log"), "metrics": None, "bpf_pin_dir": pin_dir}))
    return netns, tmp, pin_dir, sock, config


@contextmanager
def bench_gateway(name: str):
    """A started daemon (its socket answers), on gateway_files(NAME)."""
    netns, tmp, pin_dir, sock, config = gateway_files(name)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    daemon = None
    try:
        daemon = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway",
                                   "run", "--config", str(config)], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / "daemon.log", "w"))
        wait_socket(sock, daemon, 120)
        yield BenchGateway(sock, daemon, tmp / "daemon.log")
    finally:
        stop_gateway(daemon, netns, config, pin_dir, tmp)


def stop_gateway(daemon, netns: str, config: Path, pin_dir: str, tmp: Path, wait: float = 30) -> None:
    """Stop DAEMON (if it runs) and take away what its gateway made: its interface and
    routes (`gateway teardown`), its namespace, pins and files."""
    if daemon is not None and daemon.poll() is None:
        daemon.terminate()
        daemon.wait(timeout=wait)
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway", "teardown",
                    "--config", str(config)], cwd=REPO, capture_output=True)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    shutil.rmtree(pin_dir, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def wait_socket(path: str, proc: subprocess.Popen, timeout: float) -> None:
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


def apply_args(dep) -> dict:
    """The `policy.apply` call's arguments for the whole deployment (policy and identities)."""
    return {"policy_text": yaml.safe_dump(policy_doc(dep.policy), sort_keys=False), "policy_name": "policy.yaml",
            "identities_text": yaml.safe_dump(identities_doc(dep.identities), sort_keys=False),
            "identities_name": "identities.yaml"}
