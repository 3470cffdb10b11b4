"""The lab's private resolver: dnsmasq (Debian's), in zt-app on 10.20.0.53 port 53, UDP and
TCP, serving the app's names and nothing else (no upstream, no /etc/hosts):

    app.lab.example      A      10.20.0.10
    rdp.lab.example      A      10.20.0.11
    wiki.lab.example     A      10.20.0.12   (the demo policy reaches it by name only)
    docs.lab.example     CNAME  wiki.lab.example

Records carry a TTL of 1 s (the gateway's `dns: min_ttl` floor, 5 s in the lab, holds them
longer), so that the demo and the tests see a learned name expire.

The devices' WireGuard configurations name it (`DNS = 10.20.0.53`, printed by `ztgate device
add`); wg-quick would hand that to resolvconf, which in namespaces is the host's own
/etc/resolv.conf, so the lab brings the tunnels up without that line and devices ask the
resolver by address (`dig @10.20.0.53 app.lab.example`).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

ADDRESS = "10.20.0.53"
NAMES = {"app.lab.example": "10.20.0.10", "rdp.lab.example": "10.20.0.11", "wiki.lab.example": "10.20.0.12"}
CNAMES = {"docs.lab.example": "wiki.lab.example"}
TTL = 1
CONF = """\
# the lab's resolver (lab/resolver.py)
listen-address={address}
bind-interfaces
port=53
no-resolv
no-hosts
no-poll
local-ttl={ttl}
log-queries
log-facility=-
user=root
pid-file=
{records}
"""


def command(run: Path) -> list[str]:
    """dnsmasq in the foreground with the lab's configuration (written under RUN)."""
    records = [f"host-record={name},{addr}" for name, addr in NAMES.items()]
    records += [f"cname={alias},{target}" for alias, target in CNAMES.items()]
    conf = run / "dnsmasq.conf"
    conf.write_text(CONF.format(address=ADDRESS, ttl=TTL, records="\n".join(records)))
    return ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"]


def answers(ns: str) -> bool:
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "dig", f"@{ADDRESS}", "+short", "+time=1",
                        "+tries=1", "app.lab.example"], capture_output=True, text=True, timeout=10)
    return r.stdout.strip() == NAMES["app.lab.example"]


def without_dns(conf: Path) -> Path:
    """A copy of a device's WireGuard configuration without its DNS line (see above), under
    the same name (wg-quick names the interface after the file) in a folder beside it."""
    out = conf.parent / "tunnels" / conf.name
    out.parent.mkdir(mode=0o700, exist_ok=True)
    lines = [line for line in conf.read_text().splitlines() if not line.replace(" ", "").startswith("DNS=")]
    out.write_text("\n".join(lines) + "\n")
    out.chmod(0o600)
    return out
