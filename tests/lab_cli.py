"""The lab's gateway seen from the host, through the `ztgate` CLI over the default socket (so
anything using it runs under the lab lock): commands, flow events, metrics, and the reference
evaluator on what the gateway holds. Shared by tests/net/test_lab.py, test_soak.py and
scripts/soak."""
from __future__ import annotations

import json
import subprocess
from ipaddress import ip_address
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from control.files import parse_identities, parse_policy
from control.model import ICMP, TCP, UDP, Packet
from control.reference import decide
from lab.lab import NS_GW, RUN, ztgate
from tests.netns import REPO

PROTO = {"tcp": TCP, "udp": UDP, "icmp": ICMP}


def lab_is_there() -> bool:
    return Path(f"/run/netns/{NS_GW}").exists() and RUN.exists()


def cli(*args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """`ztgate ARGS` from the host's namespace: it reaches the lab's gateway over the default socket."""
    r = subprocess.run(ztgate() + [str(a) for a in args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"ztgate {' '.join(map(str, args))}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def cli_json(*args):
    return json.loads(cli(*args, "--json").stdout)


def flow_events(*args) -> list[dict]:
    """`ztgate logs --json` prints one event a line, as the flow log holds them."""
    return [json.loads(line) for line in cli("logs", "--json", "--limit", "5000", *args).stdout.splitlines()]


def metrics() -> dict[tuple, float]:
    """The gateway's Prometheus samples: (name, ((label, value), ...)) -> value."""
    r = subprocess.run(["nsenter", f"--net=/run/netns/{NS_GW}", "curl", "-sf", "--max-time", "5",
                        "http://127.0.0.1:9469/metrics"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, f"metrics: curl exit {r.returncode} {r.stderr}"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.stdout) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Reference:
    """The reference evaluator on what the running gateway holds (policy show / identities show)."""

    def __init__(self):
        self.policy = parse_policy(yaml.safe_load(cli_json("policy", "show")["policy"]), "policy show")
        self.identities = parse_identities(yaml.safe_load(cli_json("identities", "show")["identities"]),
                                           "identities show")
        self.address = {d.name: str(d.tunnel_ipv4) for d in self.identities.devices}
        self.user = {d.name: d.user for d in self.identities.devices}

    def decide(self, device: str, proto: str, dst: str, dport=None, sport=None, src=None):
        ports = proto in ("tcp", "udp")
        return decide(self.policy, self.identities, Packet(
            ip_address(src or self.address[device]), ip_address(dst), PROTO[proto],
            sport if ports else None, dport if ports else None))
