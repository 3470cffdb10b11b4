"""Devices of one's own in the lab that enroll through the IdP (spec/IDENTITY.md), beside the
lab's hand-made alice-laptop and bob-laptop: a namespace on the underlay bridge, `ztgate login
--up` in it, and the person who approves that login at the IdP (an HTTP client that fills in
the IdP's real device page and login form, inside the device's namespace). For the demo, the
tests and trying by hand (as root, with the lab up):

    python -m lab.idp add-user --admin /run/ztgate-lab/idp/admin.sock carol@example.com \\
        --groups developers --password carol-password       # the IdP provisions her over SCIM
    python -m lab.guest add zt-carol 198.18.0.13             # a namespace on the bridge
    python -m lab.guest login zt-carol carol-laptop carol@example.com   # login, enroll, tunnel up
    python -m lab.guest remove zt-carol

Each guest is listed under /run/ztgate-lab/guests, so that `ztgate lab down` removes it too.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from lab import lab
from lab.idp import lab as idp_lab

GUESTS = lab.RUN / "guests"
TAKEN = {ipaddress.ip_address(a) for a in lab.UNDERLAY.values()}     # the addresses of spec/LAB.md
UNDERLAY_NET = ipaddress.ip_network("198.18.0.0/24")


def iface_of(ns: str) -> str:
    """Its WireGuard interface (wg-quick names it after the configuration file); unique across
    namespaces, as wireguard-go's sockets in /var/run/wireguard are."""
    return f"ztg-{ns.removeprefix('zt-')}"[:15]


def config_of(ns: str) -> Path:
    return GUESTS / f"{iface_of(ns)}.conf"


def add(ns: str, address: str) -> None:
    """Namespace NS with eth0 at ADDRESS/24 on the lab's bridge (port `g-...` in zt-net)."""
    addr = ipaddress.ip_address(address)
    if addr not in UNDERLAY_NET or addr in TAKEN or addr == UNDERLAY_NET.network_address:
        raise lab.LabError(f"{address}: pick a free address of 198.18.0.0/24 (spec/LAB.md uses "
                           f"{', '.join(sorted(map(str, TAKEN)))})")
    if ns in lab.namespaces():
        raise lab.LabError(f"namespace {ns} exists already")
    GUESTS.mkdir(mode=0o700, parents=True, exist_ok=True)
    (GUESTS / f"{ns}.json").write_text(json.dumps({"ns": ns, "address": address, "iface": iface_of(ns)}))
    port = f"g-{ns.removeprefix('zt-')}"[:15]
    lab.ip("netns", "add", ns)
    lab.ip("-n", ns, "link", "set", "lo", "up")
    lab.ip("-n", lab.NS_NET, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
    lab.ip("-n", lab.NS_NET, "link", "set", port, "master", "br0", "up")
    lab.ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    lab.ip("-n", ns, "link", "set", "eth0", "up")


def remove(ns: str) -> None:
    """The namespace, its processes (wireguard-go), its veth (it goes with the namespace) and files."""
    if ns in lab.namespaces():
        lab._kill_all(ns)
        lab.ip("netns", "del", ns)
    lab._remove_stale_socket(Path(f"/var/run/wireguard/{iface_of(ns)}.sock"))
    config_of(ns).unlink(missing_ok=True)
    (GUESTS / f"{ns}.json").unlink(missing_ok=True)


def remove_all() -> list[str]:
    """Every guest the lab lists (`ztgate lab down` calls this)."""
    names = [p.stem for p in GUESTS.glob("*.json")] if GUESTS.exists() else []
    for ns in names:
        remove(ns)
    return names


def login(ns: str, name: str, email: str, password: Optional[str] = None, flow: str = "device",
          say=lambda text: None) -> dict:
    """`ztgate login --up` in NS as device NAME, approved by EMAIL at the IdP; its JSON answer.
    SAY gets what the device prints for its person, and what the person saw."""
    cmd = lab.in_ns(ns, lab.ztgate() + ["login", "--gateway", idp_lab.ENROLL_URL, "--ca",
                                        str(idp_lab.Paths(lab.RUN).ca), "--config", str(config_of(ns)),
                                        "--name", name, "--flow", flow, "--up", "--json"])
    device = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=lab.REPO,
                              env=dict(os.environ, **lab.WG_QUICK_ENV))
    try:
        first = device.stderr.readline()
        say(f"{ns}: {first.strip()}")
        if flow == "device":            # "To log in, open URL and enter the code CODE"
            url, code = first.split("open ", 1)[1].split(" and enter the code ")
            person = [url.strip(), email, "--code", code.strip()]
        else:                           # "To log in, open this URL in a browser on this machine:\nURL"
            person = [device.stderr.readline().strip(), email]
        approved = lab.sh([sys.executable, "-m", "lab.guest", "person", *person,
                           "--password", password or idp_lab.password(email)], ns=ns, check=False)
        say(f"the person at the IdP, as {email}: {approved.stdout.strip() or approved.stderr.strip()}")
        out, err = device.communicate(timeout=60)
        if device.returncode != 0:
            raise lab.LabError(f"ztgate login in {ns}: {first}{err.strip()}; the person at the IdP: "
                               f"{approved.stdout.strip()} {approved.stderr.strip()}")
        return json.loads(out)
    finally:
        if device.poll() is None:
            device.kill()
            device.wait()


def person(url: str, email: str, password: str, code: Optional[str]) -> str:
    """A person at a browser (run in the device's namespace): the IdP's device page with CODE,
    or its login form, then the redirect back to `ztgate login`'s loopback listener."""
    import httpx
    with httpx.Client(verify=str(idp_lab.Paths(lab.RUN).ca), timeout=30) as browser:
        form = browser.get(url)
        csrf = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        data = {"csrf_token": csrf, "email": email, "password": password}
        if code is not None:
            data["user_code"] = code
        done = browser.post(url if code is None else url.split("?")[0], data=data)
        if code is None and done.status_code == 302:
            return f"logged in; back to {done.headers['location'].split('?')[0]}: " \
                   f"{browser.get(done.headers['location']).status_code}"
        message = done.text.split('<p id="message">')[-1].split("</p>")[0]
        return f"{done.status_code} {message}"


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.guest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = ap.add_subparsers(dest="verb", required=True)
    a = verbs.add_parser("add", help="a device namespace on the lab's bridge")
    a.add_argument("ns")
    a.add_argument("address", help="a free address of 198.18.0.0/24")
    verbs.add_parser("remove", help="remove a device namespace").add_argument("ns")
    lo = verbs.add_parser("login", help="ztgate login --up in NS, approved at the IdP as EMAIL")
    lo.add_argument("ns")
    lo.add_argument("name", help="the device's name")
    lo.add_argument("--flow", choices=("device", "code"), default="device")
    pe = verbs.add_parser("person", help="(in a device namespace) approve a login at the IdP's page")
    pe.add_argument("url")
    pe.add_argument("--code", help="the device code (the device grant's page)")
    for sp in (lo, pe):
        sp.add_argument("email")
        sp.add_argument("--password", help="default: the lab's (alice@example.com: alice-password)")
    args = ap.parse_args()
    try:
        if args.verb == "add":
            add(args.ns, args.address)
        elif args.verb == "remove":
            remove(args.ns)
        elif args.verb == "login":
            print(json.dumps(login(args.ns, args.name, args.email, args.password, args.flow,
                                   say=lambda text: print(text, file=sys.stderr, flush=True))))
        else:
            print(person(args.url, args.email, args.password or idp_lab.password(args.email), args.code))
    except lab.LabError as e:
        print(f"python -m lab.guest {args.verb}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
