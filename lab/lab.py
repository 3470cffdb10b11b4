"""`ztgate lab up | status | down`: the deployment of spec/LAB.md in network namespaces, built
the way an engineer builds it on real hosts: every step is a `ztgate` command (the real
daemon in zt-gw, devices enrolled with `device add` and brought up with wg-quick, the
connector added on the gateway and run in zt-conn), plus `ip` for the wiring.

Everything the lab makes is named here, so that `down` can remove exactly it: the namespaces,
the processes in them, the gateway's pins and socket, and the files under /run/ztgate-lab.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from control.config import socket_path
from lab.idp import lab as idp_lab

from . import resolver

RUN = Path("/run/ztgate-lab")
REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "examples" / "lab" / "policy.yaml"
NS_NET, NS_GW, NS_ALICE, NS_BOB, NS_CONN, NS_APP = "zt-net", "zt-gw", "zt-alice", "zt-bob", "zt-conn", "zt-app"
NS_IDP = idp_lab.NS_IDP             # the identity provider (lab/idp), 198.18.0.30
NAMESPACES = (NS_NET, NS_GW, NS_ALICE, NS_BOB, NS_CONN, NS_APP, NS_IDP)
UNDERLAY = {NS_GW: "198.18.0.1", NS_ALICE: "198.18.0.11", NS_BOB: "198.18.0.12", NS_CONN: "198.18.0.20",
            NS_IDP: idp_lab.ADDRESS}
GW_IF = "ztlab-gw"                  # WireGuard interface names are unique across namespaces
CONNECTOR = "lab"                   # on the gateway: ztc-lab; in zt-conn: ztr-lab
PRIVATE = "10.20.0.0/16"
PIN_DIR = "/sys/fs/bpf/ztgate-lab"
USERS = (("alice@example.com", ("developers", "staff")), ("bob@example.com", ("staff",)))
DEVICES = (("alice-laptop", "alice@example.com", NS_ALICE, "ztlab-alice"),   # enrolled in this order:
           ("bob-laptop", "bob@example.com", NS_BOB, "ztlab-bob"))           # 100.96.0.2, 100.96.0.3
WG_IFACES = (GW_IF, f"ztc-{CONNECTOR}", f"ztr-{CONNECTOR}") + tuple(d[3] for d in DEVICES)
PROCESSES = (("gateway", NS_GW), ("connector", NS_CONN), ("services", NS_APP), ("idp", NS_IDP),
             ("resolver", NS_APP))
RESOLVER = resolver.ADDRESS         # dnsmasq in zt-app: the private resolver (lab/resolver.py)
GATEWAY_CONFIG = """\
# the lab's gateway (spec/LAB.md); every setting: control/config.py
socket: {socket}
interface: {gw_if}
listen_port: 51820
endpoint: {endpoint}:51820
pool_ipv4: 100.96.0.0/12
pool_ipv6: fd00:5a::/64
state_dir: {run}/state
flow_log: {run}/flows.log
metrics: 127.0.0.1:9469
bpf_pin_dir: {pin_dir}
xdp_mode: generic
dns:                        # the DNS slow path: the resolver's answers teach hostname rules
  resolvers: [{resolver}]
  min_ttl: 5                # short, so that the demo and tests see a name expire
"""
WG_QUICK_ENV = {"WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"}   # no kernel WireGuard here
TIMEOUT = 90.0


class LabError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# running things

def ztgate() -> list[str]:
    """The CLI of this installation."""
    script = Path(sys.executable).with_name("ztgate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "control.cli"]


def in_ns(ns: Optional[str], cmd: list[str]) -> list[str]:
    # nsenter --net, not `ip netns exec`: that one remounts /sys, which hides /sys/fs/bpf
    return (["nsenter", f"--net=/run/netns/{ns}"] if ns else []) + cmd


def sh(cmd: list[str], ns: Optional[str] = None, check: bool = True, env: Optional[dict] = None,
       timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    full = in_ns(ns, cmd)
    r = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    if check and r.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}`{f' in {ns}' if ns else ''} failed ({r.returncode}): "
                       f"{(r.stderr or r.stdout).strip()}")
    return r


def zt(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    return sh(ztgate() + list(args), ns=ns, check=check)


def ip(*args: str) -> None:
    sh(["ip", *args])


def start(name: str, ns: str, cmd: list[str]) -> None:
    """A process of the lab, in the background, in its own session (it outlives this command)."""
    log = open(RUN / f"{name}.log", "ab")
    p = subprocess.Popen(in_ns(ns, cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, cwd=REPO)
    (RUN / f"{name}.pid").write_text(str(p.pid))


def alive(name: str) -> bool:
    try:
        pid = int((RUN / f"{name}.pid").read_text())
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def wait_for(what: str, check, timeout: float = TIMEOUT, log: Optional[str] = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        if log and not alive(log):
            raise LabError(f"{what}: the {log} process died; its log, {RUN / (log + '.log')}, says:\n"
                           + _tail(RUN / f"{log}.log"))
        time.sleep(0.2)
    raise LabError(f"{what}: not within {timeout:.0f} s" + (f"; see {RUN / (log + '.log')}" if log else ""))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def namespaces() -> set[str]:
    r = sh(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def gateway_status() -> Optional[dict]:
    r = zt("status", "--json", check=False)
    try:
        return json.loads(r.stdout) if r.returncode == 0 else None
    except ValueError:
        return None


def _step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# up

def healthy() -> bool:
    if not set(NAMESPACES) <= namespaces() or not all(alive(name) for name, _ in PROCESSES):
        return False
    status = gateway_status()
    return bool(status and status.get("interface") == GW_IF)


def up() -> int:
    if os.geteuid() != 0:
        print("ztgate lab up: run as root (it makes namespaces, interfaces and BPF programs)", file=sys.stderr)
        return 2
    if healthy():
        print("the lab is up already")
        return status()
    status_now = gateway_status()
    if status_now and status_now.get("interface") != GW_IF:
        print(f"ztgate lab up: a gateway that is not the lab's answers on {socket_path()}; stop it, or give "
              "the lab another socket: ZTGATE_SOCKET=/run/ztgate-lab.sock ztgate lab up (and the same "
              "ZTGATE_SOCKET for the other verbs)", file=sys.stderr)
        return 2
    if set(NAMESPACES) & namespaces() or RUN.exists():
        print("a lab is partly there: removing it first")
        down()
    try:
        _build()
    except (LabError, subprocess.TimeoutExpired) as e:
        print(f"ztgate lab up: {e}\nthe lab is left as it is for a look; `ztgate lab down` removes it",
              file=sys.stderr)
        return 1
    print()
    print("The lab is up. Try:")
    print("  ztgate status; ztgate device list; ztgate connector list; ztgate logs --follow")
    print("  nsenter --net=/run/netns/zt-alice curl -s http://10.20.0.10:8080/      # alice reaches the app")
    print("  nsenter --net=/run/netns/zt-bob timeout 3 bash -c '</dev/tcp/10.20.0.10/22'   # bob is blocked on 22")
    print("  ztgate trace --user bob@example.com --dst 10.20.0.10 --proto tcp --dport 22")
    print("Remove it with: ztgate lab down")
    return 0


def _build() -> None:
    total = 9
    RUN.mkdir(mode=0o700, parents=True, exist_ok=True)
    _step(1, total, "namespaces, the underlay bridge (198.18.0.0/24) and the private LAN (10.20.0.0/24)")
    for ns in NAMESPACES:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        # A new namespace may copy the host's IPv4 settings: forwarding stays off everywhere but
        # where ztgate turns it on (the gateway's tunnels, the connector's tunnel and LAN).
        sh(["sysctl", "-qw", "net.ipv4.conf.all.forwarding=0", "net.ipv4.conf.default.forwarding=0",
            "net.ipv6.conf.all.forwarding=0", "net.ipv6.conf.default.forwarding=0"], ns=ns)
    ip("-n", NS_NET, "link", "add", "br0", "type", "bridge")
    ip("-n", NS_NET, "link", "set", "br0", "up")
    for ns, addr in UNDERLAY.items():
        port = f"to-{ns[3:]}"
        ip("-n", NS_NET, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", NS_NET, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", NS_CONN, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", NS_APP)
    ip("-n", NS_CONN, "addr", "add", "10.20.0.1/24", "dev", "lan0")
    ip("-n", NS_CONN, "link", "set", "lan0", "up")
    for addr in ("10.20.0.10/24", "10.20.0.11/24", "10.20.0.12/24", f"{RESOLVER}/24"):
        ip("-n", NS_APP, "addr", "add", addr, "dev", "eth0")
    ip("-n", NS_APP, "link", "set", "eth0", "up")
    ip("-n", NS_APP, "route", "add", "default", "via", "10.20.0.1")   # the LAN's router is the connector

    _step(2, total, f"the lab's CA ({RUN}/ca.pem), certificates for the IdP and the enrollment service, "
                    f"and the identity provider in {NS_IDP} (issuer {idp_lab.ISSUER})")
    start("idp", NS_IDP, idp_lab.prepare(RUN, USERS))
    wait_for("the IdP serving", lambda: idp_lab.serving(RUN), log="idp")

    _step(3, total, f"the gateway daemon in {NS_GW} (ztgate gateway run: WireGuard {GW_IF} on "
                    f"{UNDERLAY[NS_GW]}:51820, XDP, store, socket {socket_path()}; enrollment and SCIM "
                    f"at {idp_lab.ENROLL_URL}, trusting the IdP)")
    (RUN / "gateway.yaml").write_text(GATEWAY_CONFIG.format(socket=socket_path(), gw_if=GW_IF, endpoint=UNDERLAY[NS_GW],
                                                            run=RUN, pin_dir=PIN_DIR, resolver=RESOLVER)
                                         + idp_lab.gateway_identity(RUN))
    start("gateway", NS_GW, ztgate() + ["gateway", "run", "--config", str(RUN / "gateway.yaml")])
    wait_for("the gateway answering on its socket", gateway_status, log="gateway")

    _step(4, total, "users and groups (ztgate user add)")
    for email, groups in USERS:
        zt("user", "add", email, *[a for g in groups for a in ("--group", g)])
        print(f"      {email}: {', '.join(groups)}")

    _step(5, total, f"the demo policy (ztgate policy apply {POLICY.relative_to(REPO)})")
    zt("policy", "apply", str(POLICY))

    _step(6, total, f"the connector: `ztgate connector add {CONNECTOR}` on the gateway, "
                    f"`ztgate route add {PRIVATE} --connector {CONNECTOR}`, `ztgate connector run` in {NS_CONN}")
    (RUN / "connector.yaml").write_text(zt("connector", "add", CONNECTOR).stdout)
    os.chmod(RUN / "connector.yaml", 0o600)
    zt("route", "add", PRIVATE, "--connector", CONNECTOR)
    start("connector", NS_CONN, ztgate() + ["connector", "run", str(RUN / "connector.yaml"), "--lan", "lan0"])
    wait_for("the connector's handshake with the gateway", lambda: _handshake("connector.list", CONNECTOR),
             log="connector")

    _step(7, total, "devices: `ztgate device add` on the gateway, `wg-quick up` in each device namespace")
    for name, email, ns, ifname in DEVICES:
        conf = RUN / f"{ifname}.conf"
        conf.write_text(zt("device", "add", name, "--user", email).stdout)
        os.chmod(conf, 0o600)
        sh(["wg-quick", "up", str(resolver.without_dns(conf))], ns=ns, env=WG_QUICK_ENV)
        wait_for(f"{name}'s handshake", lambda: _handshake("device.list", name))
        print(f"      {name} ({email}) in {ns}: {_device_address(name)}")

    _step(8, total, f"services on {NS_APP}: http 10.20.0.10:8080, tcp echo :22, udp echo :5353, "
                    f"tcp 10.20.0.11:3389, http 10.20.0.12:8080; the resolver (dnsmasq) on {RESOLVER}:53")
    start("services", NS_APP, [sys.executable, "-m", "lab.services"])
    wait_for("the services listening", lambda: "services up" in _tail(RUN / "services.log"), log="services")
    start("resolver", NS_APP, resolver.command(RUN))
    wait_for("the resolver answering", lambda: resolver.answers(NS_APP), log="resolver")

    _step(9, total, "a first packet: alice fetches http://10.20.0.10:8080/ through her tunnel")
    page = wait_for("alice's first page", lambda: http_get(NS_ALICE, "10.20.0.10", 8080), timeout=15)
    print(f"      {page.strip()}")


def _handshake(op: str, name: str) -> bool:
    noun = op.split(".")[0]
    r = zt(noun, "list", "--json", check=False)
    try:
        rows = json.loads(r.stdout)
    except ValueError:
        return False
    return any(row["name"] == name and row.get("last_handshake") for row in rows)


def _device_address(name: str) -> str:
    rows = json.loads(zt("device", "list", "--json").stdout)
    return ", ".join(next(r["addresses"] for r in rows if r["name"] == name))


def http_get(ns: str, host: str, port: int, timeout: float = 3.0) -> Optional[str]:
    """A page fetched from inside a namespace (python's urllib: nothing else to install)."""
    code = ("import sys, urllib.request\n"
            f"print(urllib.request.urlopen('http://{host}:{port}/', timeout={timeout}).read().decode(), end='')")
    r = sh([sys.executable, "-c", code], ns=ns, check=False, timeout=timeout + 5)
    return r.stdout if r.returncode == 0 else None


# ---------------------------------------------------------------------------------------------
# status

def status(as_json: bool = False) -> int:
    present = namespaces()
    report = {"namespaces": {ns: ns in present for ns in NAMESPACES},
              "processes": {name: alive(name) for name, _ in PROCESSES}}
    st = gateway_status()
    lab_gateway = bool(st and st.get("interface") == GW_IF)
    if lab_gateway:
        report["gateway"] = {k: st.get(k) for k in ("interface", "attach_mode", "program_id", "generation",
                                                     "devices", "devices_online", "warnings")}
        for noun in ("connector", "device"):
            report[noun + "s"] = {row["name"]: row.get("last_handshake")
                                  for row in json.loads(zt(noun, "list", "--json").stdout)}
        page = http_get(NS_ALICE, "10.20.0.10", 8080)
        report["check"] = {"alice_http_8080": page.strip() if page else None}
    report["idp"] = _idp_status(present)
    healthy_now = (lab_gateway and bool(report["check"]["alice_http_8080"]) and all(report["processes"].values())
                   and report["idp"]["discovery_from_gateway"] and report["idp"]["enrollment_from_idp"])
    report["healthy"] = healthy_now
    if as_json:
        print(json.dumps(report, indent=2))
        return 0 if healthy_now else 1
    print("namespaces: " + "  ".join(f"{ns} {'yes' if ok else 'NO'}" for ns, ok in report["namespaces"].items()))
    print("processes:  " + "  ".join(f"{name} ({ns}) {'running' if report['processes'][name] else 'NOT RUNNING'}"
                                     for name, ns in PROCESSES))
    if not lab_gateway:
        print(f"gateway:    not answering on {socket_path()}" if not st else
              f"gateway:    the one on {socket_path()} is not the lab's ({st.get('interface')})")
        return 1
    g = report["gateway"]
    print(f"gateway:    {GW_IF} ({g['attach_mode']} XDP, program {g['program_id']}), generation {g['generation']}, "
          f"{g['devices_online']}/{g['devices']} devices online")
    for warning in g.get("warnings") or []:
        print(f"warning:    {warning}")
    for noun in ("connector", "device"):
        for name, hs in report[noun + "s"].items():
            seen = f"handshake {int(time.time() - hs)}s ago" if hs else "no handshake"
            print(f"{noun + ':':<11} {name:<13} {seen}")
    page = report["check"]["alice_http_8080"]
    print(f"check:      alice -> http://10.20.0.10:8080/ {'answers: ' + page if page else 'does NOT answer'}")
    idp = report["idp"]
    print(f"idp:        {idp['issuer']} {'answers the gateway' if idp['discovery_from_gateway'] else 'does NOT answer'}"
          f", signing key {idp['current_kid'] or '(admin socket not answering)'}, CA {idp['ca']}")
    print(f"enrollment: {idp_lab.ENROLL_URL} {'answers the IdP' if idp['enrollment_from_idp'] else 'does NOT answer'}")
    return 0 if healthy_now else 1


def _idp_status(present: set[str]) -> dict:
    """The IdP answers the gateway (discovery), and the gateway's enrollment service (where
    the IdP's SCIM pushes go) answers the IdP."""
    keys = idp_lab.current_kids(RUN)
    reached = NS_GW in present and sh(idp_lab.discovery_check(RUN), ns=NS_GW, check=False).returncode == 0
    enrolls = NS_IDP in present and sh(idp_lab.enrollment_check(RUN), ns=NS_IDP, check=False).returncode == 0
    return {"issuer": idp_lab.ISSUER, "ca": str(idp_lab.Paths(RUN).ca), "discovery_from_gateway": reached,
            "enrollment": idp_lab.ENROLL_URL, "enrollment_from_idp": enrolls,
            "current_kid": keys["current"] if keys else None, "kids": keys["kids"] if keys else []}


# ---------------------------------------------------------------------------------------------
# down

def down() -> int:
    if os.geteuid() != 0:
        print("ztgate lab down: run as root", file=sys.stderr)
        return 2
    from lab.guest import remove_all      # devices made with `python -m lab.guest` (they enroll by login)
    guests = remove_all()
    if guests:
        print(f"removed guest devices {', '.join(guests)}")
    present = namespaces()
    killed = 0
    for ns in NAMESPACES:
        if ns in present:
            killed += _kill_all(ns)
    print(f"stopped {killed} lab processes")
    config = RUN / "gateway.yaml"
    other = gateway_status()
    if other and other.get("interface") != GW_IF:
        # a gateway that is not the lab's answers on the socket: its socket is not ours to remove
        print(f"  {socket_path()} belongs to another gateway ({other.get('interface')}): left alone")
        config = Path("/nonexistent")
    if config.exists():
        r = zt("gateway", "teardown", "--config", str(config), ns=NS_GW if NS_GW in present else None, check=False)
        for line in r.stdout.splitlines():
            print(f"  {line}")
        if r.returncode != 0:
            print(f"  gateway teardown: {r.stderr.strip()}", file=sys.stderr)
    for ns in NAMESPACES:
        if ns in present:
            ip("netns", "del", ns)
    if present & set(NAMESPACES):
        print(f"removed namespaces {', '.join(ns for ns in NAMESPACES if ns in present)}")
    for name in WG_IFACES:     # wireguard-go's sockets, if one died without removing its own
        _remove_stale_socket(Path(f"/var/run/wireguard/{name}.sock"))
    if Path(PIN_DIR).exists():
        from dataplane.libbpf import unpin_all
        from dataplane.pinned import forget_record
        unpin_all(PIN_DIR)
        forget_record(PIN_DIR)     # the gateway's record of its pins (a restart adopts by it)
        shutil.rmtree(PIN_DIR, ignore_errors=True)
    if RUN.exists():
        shutil.rmtree(RUN)
        print(f"removed {RUN}")
    print("the lab is down")
    return 0


def _remove_stale_socket(path: Path) -> None:
    """Remove a Unix socket nothing answers on (a live one is someone else's)."""
    import socket as sk
    if not path.exists():
        return
    with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return
        except OSError:
            pass
    path.unlink(missing_ok=True)


def _kill_all(ns: str) -> int:
    """Every process in the namespace: SIGTERM (they clean up after themselves), then SIGKILL."""
    def pids() -> list[int]:
        r = sh(["ip", "netns", "pids", ns], check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]

    found = pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while pids() and time.time() < deadline:
            time.sleep(0.1)
        if not pids():
            break
    return len(found)
