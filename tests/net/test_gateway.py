"""The gateway end to end: the real daemon in a namespace with a real wireguard-go interface
and the real XDP program, a device enrolled with `ztgate device add` and brought up with
wg-quick, real TCP/UDP to servers behind the gateway, all driven through the `ztgate` CLI.

    dev namespace                  gw namespace                         app namespace
    wg-quick (device add's conf)   ztgate gateway run                   10.20.0.10 tcp 22, 8080; udp 5353
    198.18.0.11 <--- veth ---> 198.18.0.1   zt (XDP)  10.20.0.1 <-- veth --> 10.20.0.11 tcp 3389
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from control import wireguard
from dataplane.attach import attached, detach
from tests.netns import PYTHON, REPO, Namespaces, wait_until

LAB = REPO / "examples" / "lab"
APP_WEB, APP_RDP = "10.20.0.10", "10.20.0.11"
SERVERS = r"""
import socket, threading
def tcp(addr, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((addr, port)); s.listen(64)
    def serve(c):
        with c:
            c.sendall(f"hello from {addr}:{port}\n".encode())
            while True:
                data = c.recv(4096)
                if not data: return
                c.sendall(data)
    while True:
        c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
def udp(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port))
    while True:
        data, peer = s.recvfrom(4096); s.sendto(b"echo " + data, peer)
for a, p in (("10.20.0.10", 22), ("10.20.0.10", 8080), ("10.20.0.11", 3389)):
    threading.Thread(target=tcp, args=(a, p), daemon=True).start()
threading.Thread(target=udp, args=("10.20.0.10", 5353), daemon=True).start()
print("serving", flush=True)
threading.Event().wait()
"""


class Site:
    """The three namespaces, the daemon (which tests may kill and restart) and the CLI."""

    def __init__(self, ns: Namespaces, tmp: Path):
        self.ns, self.tmp = ns, tmp
        self.sock = str(tmp / "ztgate.sock")
        self.pin_dir = f"/sys/fs/bpf/ztgate-test-{ns.token}"
        self.iface = ns.ifname("zt")
        self.metrics_port = 19469
        self.config = tmp / "gateway.yaml"
        self.config.write_text(yaml.safe_dump({
            "interface": self.iface, "listen_port": 51820, "endpoint": "198.18.0.1:51820",
            "routes": ["10.20.0.0/16"], "state_dir": str(tmp / "state"), "socket": self.sock,
            "flow_log": str(tmp / "flows.log"), "metrics": f"127.0.0.1:{self.metrics_port}",
            "bpf_pin_dir": self.pin_dir}))
        self.daemon = None
        self.stderr = tmp / "daemon.stderr"

    def start(self, **env) -> None:
        self.daemon = self.ns.popen("gw", PYTHON, "-m", "control.cli", "gateway", "run", "--config", self.config,
                                    cwd=REPO, env=dict(os.environ, **env), stdout=subprocess.DEVNULL,
                                    stderr=open(self.stderr, "a"))
        wait_until(lambda: self.daemon.poll() is not None or self._answers(), timeout=60, what="the gateway to serve")
        assert self.daemon.poll() is None, self.stderr.read_text()[-3000:]

    def _answers(self) -> bool:
        return self.ztgate("status", "--json", check=False).returncode == 0

    def kill(self) -> None:
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=10)

    def ztgate(self, *args, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """The CLI, run from the host's own namespace: the socket reaches the gateway anyway."""
        r = subprocess.run([PYTHON, "-m", "control.cli", *map(str, args), "--socket", self.sock], cwd=REPO,
                           capture_output=True, text=True, timeout=120, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"ztgate {' '.join(map(str, args))}: exit {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def json(self, *args):
        return json.loads(self.ztgate(*args, "--json").stdout)

    def logs(self, *args) -> list[dict]:
        """`ztgate logs --json` prints one event a line, as the flow log holds them."""
        return [json.loads(line) for line in self.ztgate("logs", "--json", *args).stdout.splitlines()]

    # traffic from the device ----------------------------------------------------------------
    def tcp(self, addr: str, port: int, timeout: float = 1.5) -> socket.socket | None:
        """A connection from the device to addr:port that got the server's greeting, or None."""
        s = self.ns.socket("dev", socket.SOCK_STREAM, timeout=timeout)
        try:
            s.connect((addr, port))
            if s.recv(100).startswith(b"hello"):
                return s
        except OSError:
            pass
        s.close()
        return None

    def echo(self, s: socket.socket, payload: bytes = b"ping") -> bool:
        try:
            s.sendall(payload)
            return s.recv(100) == payload
        except OSError:
            return False

    def udp(self, addr: str, port: int) -> bool:
        s = self.ns.socket("dev", socket.SOCK_DGRAM, timeout=1.0)
        try:
            s.sendto(b"hi", (addr, port))
            return s.recvfrom(100)[0] == b"echo hi"
        except OSError:
            return False
        finally:
            s.close()

    def metrics(self) -> str:
        with self.ns.inside("gw"):
            return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    os.chmod(tmp, 0o755)
    with Namespaces("ztgw") as ns:
        for name in ("gw", "dev", "app"):
            ns.add(name)
        ns.veth("gw", "dev", "198.18.0.1/24", "198.18.0.11/24")
        _, app_if = ns.veth("gw", "app", "10.20.0.1/24", f"{APP_WEB}/24")
        ns.run("app", "ip", "addr", "add", f"{APP_RDP}/24", "dev", app_if)
        ns.run("app", "ip", "route", "add", "default", "via", "10.20.0.1")
        ns.run("gw", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        servers = ns.popen("app", PYTHON, "-c", SERVERS, stdout=subprocess.PIPE, text=True)
        assert servers.stdout.readline().strip() == "serving"
        s = Site(ns, tmp)
        try:
            s.start()
            yield s
        finally:
            if s.daemon and s.daemon.poll() is None:
                s.daemon.terminate()
                s.daemon.wait(timeout=10)
            ns.run("gw", PYTHON, "-m", "control.cli", "gateway", "teardown", "--config", s.config, cwd=REPO,
                   check=False, timeout=30)
            subprocess.run(["rm", "-rf", s.pin_dir])


@pytest.fixture(scope="module")
def alice(site):
    """alice enrolled as the lab has her; her laptop up with the configuration device add printed."""
    site.ztgate("user", "add", "alice@example.com", "--group", "developers", "--group", "staff")
    site.ztgate("user", "add", "bob@example.com", "--group", "staff")
    applied = site.ztgate("policy", "apply", LAB / "policy.yaml")
    assert "+ rule devs-app" in applied.stdout and "applied: 5 changes" in applied.stdout
    out = site.ztgate("device", "add", "alice-laptop", "--user", "alice@example.com")
    assert "only copy" in out.stderr
    name = site.ns.ifname("al")
    conf = site.tmp / f"{name}.conf"
    conf.write_text(out.stdout)
    conf.chmod(0o600)
    site.ns.run("dev", "wg-quick", "up", conf, env=dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION="wireguard-go"))
    assert "Address = 100.96.0.2/32" in out.stdout and "AllowedIPs = 10.20.0.0/16" in out.stdout
    return name


def test_enrolled_device_reaches_what_policy_allows_and_nothing_else(site, alice):
    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="alice's first connection")
    assert site.echo(web)
    assert site.tcp(APP_WEB, 22) is not None
    assert site.udp(APP_WEB, 5353)
    assert site.tcp(APP_RDP, 3389) is None            # default block
    assert site.tcp(APP_WEB, 3389) is None             # no rule for this port at all
    web.close()


def test_flow_log_names_the_user_device_rule_and_reason(site, alice):
    site.tcp(APP_WEB, 8080)
    site.tcp(APP_RDP, 3389)

    def events():
        evs = site.logs("--user", "alice@example.com", "--limit", "500")
        allowed = [e for e in evs if e["verdict"] == "allow" and e["dport"] == 8080 and e["dst"] == APP_WEB]
        blocked = [e for e in evs if e["verdict"] == "block" and e["dport"] == 3389]
        return (allowed, blocked) if allowed and blocked else None
    allowed, blocked = wait_until(events, timeout=10, what="flow events for alice")
    assert allowed[-1]["device"] == "alice-laptop" and allowed[-1]["rule"] == "devs-app"
    assert allowed[-1]["src"] == "100.96.0.2" and allowed[-1]["proto"] == "tcp"
    assert blocked[-1]["rule"] is None and blocked[-1]["reason"] == "default"
    assert site.logs("--verdict", "block", "--limit", "500")
    human = site.ztgate("logs", "--user", "alice@example.com").stdout
    assert "alice@example.com" in human and "devs-app" in human


def test_status_rules_devices_metrics_and_trace(site, alice):
    site.tcp(APP_WEB, 8080)
    status = site.json("status")
    assert status["program_id"] and status["attach_mode"] == "generic" and status["interface"] == site.iface
    assert status["devices_online"] == 1 and status["rules"] == 5 and "prog" in " ".join(status["pinned"])
    # the config's routes: this host forwards them, and nothing filters what comes back from them
    assert any("10.20.0.0/16 are forwarded by this host itself" in w for w in status["warnings"])
    rules = site.json("rule", "list")
    assert [r["name"] for r in rules] == ["devs-app", "devs-echo", "staff-web", "staff-dns", "staff-wiki-by-name"]
    assert rules[0]["packets"] > 0
    devices = site.json("device", "list")
    assert devices[0]["last_handshake"] and devices[0]["rx_bytes"] > 0
    text = site.metrics()
    assert 'ztgate_rule_packets_total{rule="devs-app",verdict="allow"}' in text
    assert "ztgate_devices_online 1.0" in text and f"ztgate_policy_generation {status['generation']}.0" in text
    trace = site.json("trace", "--user", "alice@example.com", "--dst", APP_RDP, "--dport", "3389")
    assert trace["kernel"]["verdict"] == trace["reference"]["verdict"] == "block"
    assert [t["rule"] for t in trace["tried"]] == ["devs-app", "devs-echo", "staff-web", "staff-dns", "staff-wiki-by-name"]


def test_rule_changes_decide_open_connections_too(site, alice):
    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=5, what="a connection")
    site.ztgate("rule", "add", "no-web", "--action", "block", "--proto", "tcp", "--dst-port", "8080",
                "--precedence", "10")
    assert not site.echo(web)                          # the open connection is cut
    assert site.tcp(APP_WEB, 8080) is None
    assert site.tcp(APP_WEB, 22) is not None
    site.ztgate("rule", "disable", "no-web")
    assert wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=5, what="web again")
    site.ztgate("rule", "remove", "no-web")
    shown = yaml.safe_load(site.ztgate("policy", "show").stdout)
    assert [r["name"] for r in shown["rules"]] == ["devs-app", "devs-echo", "staff-web", "staff-dns", "staff-wiki-by-name"]


def test_rule_changes_are_written_in_place_and_a_policy_that_outgrows_the_program_is_a_full_build(site, alice):
    """A rule change is written into the program's other bank (no compiler run, said in the
    log); a policy whose tables outgrow the program falls back to a full build, and says so."""
    def log_of(change):
        before = len(site.stderr.read_text())
        change()
        return site.stderr.read_text()[before:]

    added = log_of(lambda: site.ztgate("rule", "add", "no-2222", "--action", "block", "--proto", "tcp",
                                       "--dst-port", "2222", "--precedence", "5"))
    assert "in place of build" in added and "falling back" not in added, added
    doc = yaml.safe_load((LAB / "policy.yaml").read_text())
    doc["rules"] += [{"name": f"filler-{i}", "precedence": 1000 + i, "action": "block", "protocols": ["udp"],
                      "destination": {"cidrs": ["10.20.0.10/32"], "ports": [20000 + i]}} for i in range(80)]
    big = site.tmp / "big-policy.yaml"
    big.write_text(yaml.safe_dump(doc))
    grown = log_of(lambda: site.ztgate("policy", "apply", big))
    assert "falling back to a full build" in grown and "max_rules" in grown, grown
    assert site.tcp(APP_WEB, 22) is not None and site.tcp(APP_RDP, 3389) is None
    back = log_of(lambda: site.ztgate("policy", "apply", LAB / "policy.yaml"))
    assert "in place of build" in back, back                 # fewer rules fit the bigger program
    assert site.tcp(APP_WEB, 22) is not None and site.tcp(APP_RDP, 3389) is None
    shown = yaml.safe_load(site.ztgate("policy", "show").stdout)
    assert [r["name"] for r in shown["rules"]] == ["devs-app", "devs-echo", "staff-web", "staff-dns", "staff-wiki-by-name"]


def test_disable_cuts_at_once_and_enable_restores(site, alice):
    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=5, what="a connection")
    assert site.echo(web)
    site.ztgate("device", "disable", "alice-laptop")
    assert not site.echo(web)
    assert site.tcp(APP_WEB, 8080, timeout=1) is None
    # Both halves are gone: her peer admits no address (wireguard-go takes no packet from her
    # and routes none to her) and the kernel's identity (a packet from her address that got in
    # anyway would be unknown).
    (key,) = [d["public_key"] for d in site.json("device", "list") if d["name"] == "alice-laptop"]
    with site.ns.inside("gw"):
        assert wireguard.show(site.iface).peer(key).allowed_ips == []
    t = site.json("trace", "--src", "100.96.0.2", "--dst", APP_WEB, "--dport", "8080")
    assert t["kernel"]["verdict"] == t["reference"]["verdict"] == "unknown"
    site.ztgate("device", "enable", "alice-laptop")
    # Her session lived on: back at once, not after the ~15 s her WireGuard would take to
    # notice a session the gateway had forgotten.
    enabled = time.monotonic()
    assert wait_until(lambda: site.tcp(APP_WEB, 8080, timeout=1), timeout=5, what="alice back after enable")
    assert time.monotonic() - enabled < 5


def test_membership_and_enrollment_change_only_that_user(site, alice):
    """One user's change rewrites only her entries (no new build), and the kernel agrees with
    the reference before and after."""
    from control.wireguard import generate_keypair

    bob_key = generate_keypair()[1]
    site.ztgate("device", "add", "bob-laptop", "--user", "bob@example.com", "--public-key", bob_key)
    build = site.json("status")["build"]

    def kernel_says(user, port):
        t = site.json("trace", "--user", user, "--dst", APP_WEB, "--dport", str(port))
        assert (t["kernel"]["verdict"], t["kernel"]["rule"]) == (t["reference"]["verdict"], t["reference"]["rule"])
        return t["kernel"]["verdict"], t["kernel"]["rule"]

    assert kernel_says("bob@example.com", 22) == ("block", None)
    assert kernel_says("bob@example.com", 8080) == ("allow", "staff-web")
    site.ztgate("group", "add-member", "developers", "bob@example.com")
    assert kernel_says("bob@example.com", 22) == ("allow", "devs-app")
    site.ztgate("group", "remove-member", "staff", "bob@example.com")
    site.ztgate("group", "remove-member", "developers", "bob@example.com")
    assert kernel_says("bob@example.com", 8080) == ("block", None)
    assert kernel_says("alice@example.com", 8080) == ("allow", "devs-app")
    assert site.json("status")["build"] == build          # all of it without a new build
    site.ztgate("device", "disable", "bob-laptop")     # (a disabled device's peer stays, admitting nothing)
    site.ztgate("user", "remove", "bob@example.com", "--with-devices")
    assert "bob" not in site.ztgate("device", "list").stdout
    with site.ns.inside("gw"):
        assert wireguard.show(site.iface).peer(bob_key) is None     # removed: its key may not even handshake
    audit = site.json("audit", "--limit", "5")
    assert audit[-1]["what"] == "user remove" and audit[-1]["uid"] == 0


def test_bad_requests_change_nothing(site, alice):
    before = site.json("status")["generation"]
    cases = [
        (("device", "add", "Bad Name", "--user", "alice@example.com"), "must match"),
        (("device", "add", "x1", "--user", "nobody@example.com"), "no user"),
        (("device", "add", "x2", "--user", "alice@example.com", "--public-key", "short"), "44 characters"),
        (("rule", "add", "bad", "--action", "allow", "--dst-port", "70000"), "outside 0-65535"),
        (("rule", "add", "devs-app", "--action", "allow"), "exists already"),
        (("rule", "move", "devs-app", "--before", "nope"), "no other rule"),
        (("rule", "remove", "nope"), "no rule named"),
        (("user", "remove", "alice@example.com"), "has devices"),
    ]
    for args, what in cases:
        r = site.ztgate(*args, check=False)
        assert r.returncode == 2 and what in r.stderr, (args, r.stderr)
    bad = site.tmp / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    precedence: 1\n    action: allow\n    destination: {cidrs: [10.0.0.1/8]}\n")
    r = site.ztgate("policy", "apply", bad, check=False)
    assert r.returncode == 2 and "host bits set" in r.stderr
    dry = site.ztgate("policy", "apply", LAB / "policy.yaml", "--dry-run")
    assert "no changes" in dry.stdout
    assert site.json("status")["generation"] == before


def test_socket_survives_garbage(site, alice):
    """Fuzz the socket with frames that are oversized, truncated, not msgpack, or msgpack
    of the wrong shape; the daemon answers or closes, and stays up and unchanged."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    import msgpack
    import struct

    before = site.json("status")["generation"]
    ints = st.integers(-(2**63), 2**64 - 1)          # what msgpack can carry
    junk = st.one_of(
        st.binary(max_size=64),
        st.builds(lambda n, b: struct.pack(">I", n) + b, st.integers(0, 2**32 - 1), st.binary(max_size=32)),
        st.builds(lambda obj: (lambda b: struct.pack(">I", len(b)) + b)(msgpack.packb(obj)),
                  st.recursive(st.none() | st.booleans() | ints | st.text(max_size=8) | st.binary(max_size=8),
                               lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                               max_leaves=8)),
        st.builds(lambda op, args: (lambda b: struct.pack(">I", len(b)) + b)(msgpack.packb({"op": op, "args": args})),
                  st.sampled_from(["device.add", "rule.add", "rule.move", "user.add", "policy.apply", "trace", "logs"]),
                  st.dictionaries(st.sampled_from(["name", "email", "rule", "precedence", "packet", "policy_text",
                                                   "policy_name", "limit", "cursor", "x"]),
                                  st.none() | ints | st.text(max_size=5) | st.lists(ints, max_size=2),
                                  max_size=3)),
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(junk)
    def send(raw):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(site.sock)
        try:
            c.sendall(raw)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
        except OSError:
            pass
        finally:
            c.close()

    send()
    assert site.daemon.poll() is None
    assert "Traceback" not in site.stderr.read_text(), "a request reached a code path that failed: see the log"
    assert site.json("status")["generation"] == before


@pytest.fixture
def reachable_sock(site):
    """The gateway's socket, hard-linked into a folder anyone may enter (pytest's own are root's
    only), so that an operator who is not root reaches it."""
    folder = Path(tempfile.mkdtemp(prefix="zt-sock-", dir=tempfile.gettempdir()))
    folder.chmod(0o755)
    link = folder / "ztgate.sock"
    os.link(site.sock, link)
    yield str(link)
    shutil.rmtree(folder)


def test_socket_refuses_strangers(site):
    st = os.stat(site.sock)
    assert oct(st.st_mode & 0o777) == "0o660" and st.st_uid == 0
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-m", "control.cli",
                        "status", "--socket", site.sock], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "not allowed" in r.stderr


# A peer that was in the operators' group when it connected, then left it (seteuid back to root
# through its saved uid, setgroups([]), nobody again) and only then asks: the gateway must judge
# the credentials of the connection, as SO_PEERGROUPS keeps them, not what /proc/PID says later
# (by then the PID may be another process's).
LEAVES_THE_GROUP = """
import os, socket, sys
from control.api import read_frame, write_frame
os.setgroups([int(sys.argv[2])]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 0)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect(sys.argv[1])
os.seteuid(0); os.setgroups([]); os.seteuid(65534)
write_frame(c, {"op": "status", "args": {}})
print(read_frame(c)["ok"])
"""


def test_operators_group_is_judged_as_it_was_at_connect(site, reachable_sock):
    import grp
    gid = grp.getgrnam("ztgate").gr_gid
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", f"--groups={gid}", PYTHON, "-m", "control.cli",
                        "status", "--socket", reachable_sock], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr                     # a member of the group may ask
    r = subprocess.run([PYTHON, "-c", LEAVES_THE_GROUP, reachable_sock, str(gid)], cwd=REPO, capture_output=True,
                       text=True, timeout=30)
    assert r.stdout.strip() == "True", r.stderr


@pytest.mark.parametrize("stage", ["before-commit", "after-commit"])
def test_kill_9_in_the_middle_of_a_change(site, alice, stage):
    """The controller dies inside a change. While it is down the kernel enforces what it
    enforced; on restart the store is whole and the kernel equals the store."""
    wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="web before the crash")
    before = site.json("status")["generation"]
    site.kill()
    site.start(ZTGATE_PAUSE_AT=stage)
    change = subprocess.Popen([PYTHON, "-m", "control.cli", "rule", "add", "no-web", "--action", "block",
                               "--proto", "tcp", "--dst-port", "8080", "--precedence", "10", "--socket", site.sock],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: f"paused at {stage}" in site.stderr.read_text(), timeout=60, what=f"the pause at {stage}")
    site.kill()
    change.wait(timeout=10)
    site.stderr.write_text("")
    # Down: enforcement goes on as before the change (the program stays attached).
    assert site.tcp(APP_WEB, 8080) is not None and site.tcp(APP_RDP, 3389) is None
    site.start()
    generation = site.json("status")["generation"]
    names = [r["name"] for r in site.json("rule", "list")]
    if stage == "before-commit":      # the transaction never committed: SQLite rolled it back
        assert generation == before and "no-web" not in names
    else:                             # committed, not yet applied when it died: start() applies it
        assert generation == before + 1 and "no-web" in names
    # The kernel equals the store: every probe's kernel verdict is the reference's.
    for args in (("--dst", APP_WEB, "--dport", "8080"), ("--dst", APP_WEB, "--dport", "22"),
                 ("--dst", APP_RDP, "--dport", "3389"), ("--dst", APP_WEB, "--proto", "udp", "--dport", "5353")):
        t = site.json("trace", "--user", "alice@example.com", *args)
        assert (t["kernel"]["verdict"], t["kernel"]["rule"]) == (t["reference"]["verdict"], t["reference"]["rule"])
    blocked = "no-web" in names
    assert (site.tcp(APP_WEB, 8080) is None) == blocked
    if blocked:
        site.ztgate("rule", "remove", "no-web")


def test_a_step_that_fails_after_the_commit_rebuilds_the_data_plane_from_the_store(site, alice):
    """Every step of a change fails after its commit (ZTGATE_FAULT=apply): the gateway makes
    a whole new build from the store, with routes and peers, so the change still takes effect
    on open flows and the CLI succeeds; the log says what failed."""
    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="web before the fault")
    site.kill()
    site.start(ZTGATE_FAULT="apply")
    try:
        build = site.json("status")["build"]
        site.ztgate("rule", "add", "no-web", "--action", "block", "--proto", "tcp", "--dst-port", "8080",
                    "--precedence", "10")
        assert site.json("status")["build"] > build
        assert not site.echo(web), "the open connection outlived the revocation"
        assert site.tcp(APP_WEB, 8080, timeout=1) is None
        t = site.json("trace", "--user", "alice@example.com", "--dst", APP_WEB, "--dport", "8080")
        assert (t["kernel"]["verdict"], t["kernel"]["rule"]) == (t["reference"]["verdict"], t["reference"]["rule"]) \
            == ("block", "no-web")
        site.ztgate("rule", "remove", "no-web")
        # A device's steps (the kernel's in-place write and forgetting its flows, its peer)
        # failing: rebuilt as well, and the flows of a device no longer enabled forgotten.
        again = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="web after the rule went")
        assert site.json("flows", "--device", "alice-laptop")
        site.ztgate("device", "disable", "alice-laptop")
        assert not site.echo(again)
        again.close()
        assert site.json("flows", "--device", "alice-laptop") == []
        (key,) = [d["public_key"] for d in site.json("device", "list") if d["name"] == "alice-laptop"]
        with site.ns.inside("gw"):
            assert wireguard.show(site.iface).peer(key).allowed_ips == []
        site.ztgate("device", "enable", "alice-laptop")
        assert wait_until(lambda: site.tcp(APP_WEB, 8080, timeout=1), timeout=10, what="alice back after enable")
        # A connector's steps: its interface (discarded with the step) is made again by the
        # rebuild, with the connector-side program on it; it is listed once.
        name = f"f{site.ns.token[:6]}"
        site.ztgate("connector", "add", name)
        assert [c["name"] for c in site.json("status")["connectors"]] == [name]
        (conn,) = site.json("status")["connectors"]
        assert conn["reply_program"]
        site.ztgate("connector", "remove", name)
        assert site.json("connector", "list") == []
        assert site.ns.run("gw", "ip", "link", "show", f"ztc-{name}", check=False).returncode != 0
        log = site.stderr.read_text()
        assert "injected fault at apply" in log and "rebuilt whole from the store" in log
    finally:
        web.close()
        site.kill()
        site.start()


def test_an_open_flow_lives_through_kill_9_and_restart_and_nothing_blocked_passes(site, alice):
    """The program and conntrack are pinned: killing the controller and starting it again
    (a new build replaces the old one, the epoch moves on) never opens a gap for what the
    policy blocks, and never cuts an allowed connection."""
    conn = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="web before the crash")
    stop = threading.Event()
    echoes, leaks = [], []

    def keep_echoing():
        while not stop.is_set():
            echoes.append(site.echo(conn))
            time.sleep(0.02)

    def knock():                    # the blocked service, over and over
        while not stop.is_set():
            s = site.tcp(APP_RDP, 3389, timeout=0.3)
            if s is not None:
                leaks.append(time.monotonic())
                s.close()

    threads = [threading.Thread(target=keep_echoing), threading.Thread(target=knock)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        site.kill()
        time.sleep(0.5)
        site.start()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        conn.close()
    assert leaks == []
    assert len(echoes) > 50 and all(echoes), f"{echoes.count(False)} of {len(echoes)} echoes went unanswered"


def test_a_restart_adopts_the_pinned_program_unless_its_source_changed(site, alice):
    """Killed and started again, the controller takes over the program it pinned (no compiler
    run: the log says so) and enforces the same policy with it; started from an edited ebpf/
    tree it compiles a new program, and so it does when the tree is back (the pins are then
    of the edited one)."""
    def on_interface() -> int:
        with site.ns.inside("gw"):
            return attached(site.iface)[0]

    def restart(**env) -> str:
        site.kill()
        site.stderr.write_text("")
        site.start(**env)
        wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="web after the restart")
        assert site.tcp(APP_RDP, 3389) is None
        return site.stderr.read_text()

    wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="web before the restart")
    first = on_interface()
    log = restart()
    assert "adopted the pinned program" in log and " attached to " not in log, log[-3000:]
    assert on_interface() == first
    edited = site.tmp / "ebpf-edited"
    shutil.rmtree(edited, ignore_errors=True)
    shutil.copytree(REPO / "ebpf", edited)
    with open(edited / "ztgate.c", "a") as f:
        f.write("/* edited */\n")
    log = restart(ZTGATE_EBPF_DIR=str(edited))
    assert "not adopted: the source or the flags differ" in log and " attached to " in log, log[-3000:]
    assert on_interface() != first
    log = restart()
    assert "not adopted: the source or the flags differ" in log and " attached to " in log, log[-3000:]


def test_a_gateway_that_cannot_attach_does_not_serve_and_leaves_nothing_open(site, alice):
    """Fail closed: with the program gone from the interface (detached by hand) and a build
    that cannot be attached (ZTGATE_FAULT=load), the daemon exits saying why, and the
    interface is down: no device packet is forwarded undecided."""
    assert site.tcp(APP_WEB, 8080) is not None
    site.kill()
    with site.ns.inside("gw"):
        detach(site.iface)
    failing = site.ns.popen("gw", PYTHON, "-m", "control.cli", "gateway", "run", "--config", site.config,
                            cwd=REPO, env=dict(os.environ, ZTGATE_FAULT="load"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, err = failing.communicate(timeout=60)
    assert failing.returncode != 0 and "injected fault at load" in err
    assert "is down until a gateway starts" in err
    assert "state DOWN" in site.ns.run("gw", "ip", "link", "show", site.iface).stdout
    assert site.tcp(APP_WEB, 8080, timeout=0.5) is None and site.tcp(APP_RDP, 3389, timeout=0.5) is None
    assert not os.path.exists(site.sock) or site.ztgate("status", check=False).returncode != 0
    site.start()                          # a gateway that can attach brings it all back
    assert wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=30, what="web after the restart")
    assert site.tcp(APP_RDP, 3389) is None


def test_an_ipv4_icmp_flow_is_killed_by_its_tuple(site, alice):
    """`flows kill icmp ...` names the flow as `ztgate flows` prints it: on IPv4 that is ICMP
    (1), not ICMPv6 (58)."""
    from scapy.layers.inet import ICMP

    site.ztgate("rule", "add", "ping-app", "--action", "allow", "--proto", "icmp", "--precedence", "5")
    try:
        with site.ns.inside("dev"):
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            s.sendto(bytes(ICMP(type=8, id=4242, seq=1) / b"ztgate"), (APP_WEB, 0))
            icmp = lambda: [f for f in site.json("flows", "--device", "alice-laptop") if f["proto"] == "icmp"]
            (flow,) = wait_until(icmp, timeout=5, what="the echo's flow")
        finally:
            s.close()
        site.ztgate("flows", "kill", "icmp", f"{flow['src']}:{flow['sport']}", f"{flow['dst']}:{flow['dport']}")
        assert [f["state"] for f in icmp()] == ["killed"]
    finally:
        site.ztgate("rule", "remove", "ping-app")


def _evict(pin_dir: str, flow: dict) -> None:
    """Delete a flow's zt_ct entry from the gateway's pinned conntrack, as the LRU does when the
    table is full of other flows (or as a timed-out entry is no longer honoured)."""
    import ipaddress

    import numpy as np

    from dataplane.libbpf import check, libbpf, obj_get
    from dataplane.mirrors import CT_KEY

    src, dst = ipaddress.ip_address(flow["src"]), ipaddress.ip_address(flow["dst"])
    key = np.zeros(1, CT_KEY)
    key["src"], key["dst"] = src.packed.ljust(16, b"\0"), dst.packed.ljust(16, b"\0")
    key["sport"], key["dport"], key["family"], key["proto"] = flow["sport"], flow["dport"], src.version, 6
    fd = obj_get(f"{pin_dir}/zt_ct")
    try:
        check(libbpf().bpf_map_delete_elem(fd, key.ctypes.data), "delete the flow's zt_ct entry")
    finally:
        os.close(fd)


def test_a_killed_connection_stays_killed_when_its_conntrack_entry_goes(site, alice):
    """A real TCP connection killed with `flows kill`, whose zt_ct entry then goes (deleted as
    eviction would): the device's next segment does not pass (without the kill table it was
    decided by the policy and opened the flow again), nor brings the flow back; a new
    connection to the same server passes. (This site's replies come back through an
    unfiltered route: the connector side's half is tests/kernel/test_kills.py's.)"""
    s = site.tcp(APP_WEB, 8080)
    assert s is not None and site.echo(s)
    try:
        sport = s.getsockname()[1]
        mine = lambda: [f for f in site.json("flows", "--device", "alice-laptop")
                        if f["proto"] == "tcp" and f["sport"] == sport and f["dport"] == 8080]
        (flow,) = wait_until(mine, timeout=5, what="the connection's flow")
        site.ztgate("flows", "kill", "tcp", f"{flow['src']}:{sport}", f"{APP_WEB}:8080")
        _evict(site.pin_dir, flow)
        assert mine() == []
        assert not site.echo(s, b"after the kill")
        assert mine() == []                               # not opened again
    finally:
        # an abort (RST), not a close: a FIN would be retransmitted into the kill for minutes,
        # moving the peer's counters under the tests that follow
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    fresh = site.tcp(APP_WEB, 8080)
    assert fresh is not None and site.echo(fresh)
    fresh.close()


def test_identities_apply_checks_keys_and_moved_addresses_lose_their_flows(site, alice):
    """policy apply --identities: a file with a bad, repeated or the gateway's own key is refused
    before anything changes; a file that gives alice's address to another device forgets her
    flows (a reply on her tuple is not decided again as the new owner's) and WireGuard admits
    the address from the new key only."""
    from control.wireguard import generate_keypair

    original = site.ztgate("identities", "show").stdout
    doc = yaml.safe_load(original)
    (laptop,) = [d for d in doc["devices"] if d["name"] == "alice-laptop"]
    before = site.json("status")["generation"]
    peers_before = site.json("device", "list")
    gateway_key = site.json("status")["public_key"]
    spare = {"name": "spare", "user": "alice@example.com", "tunnel_ipv4": "100.96.0.9"}
    for bad, what in ((dict(spare, public_key="junk"), "44 characters"),
                      (dict(spare, public_key=laptop["public_key"]), "a key of its own"),
                      (dict(spare, public_key=gateway_key), "the gateway's own key")):
        path = site.tmp / "bad-identities.yaml"
        path.write_text(yaml.safe_dump(dict(doc, devices=doc["devices"] + [bad])))
        r = site.ztgate("policy", "apply", LAB / "policy.yaml", "--identities", path, check=False)
        assert r.returncode == 2 and what in r.stderr, r.stderr
    assert site.json("status")["generation"] == before and site.json("device", "list") == peers_before

    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="alice's connection")
    assert site.json("flows", "--device", "alice-laptop")
    new_key = generate_keypair()[1]
    taken = dict(laptop, name="alice-tablet", public_key=new_key)
    path = site.tmp / "moved-identities.yaml"
    path.write_text(yaml.safe_dump(dict(doc, devices=[d for d in doc["devices"] if d is not laptop] + [taken])))
    try:
        site.ztgate("policy", "apply", LAB / "policy.yaml", "--identities", path)
        flows = site.json("flows")
        assert not [f for f in flows if f["src"] == laptop["tunnel_ipv4"]], flows
        assert not site.echo(web)                      # nothing comes back to her on the old tuple
        with site.ns.inside("gw"):
            shown = wireguard.show(site.iface)
            assert shown.peer(laptop["public_key"]) is None
            assert [str(n) for n in shown.peer(new_key).allowed_ips] == [f"{laptop['tunnel_ipv4']}/32",
                                                                         f"{laptop['tunnel_ipv6']}/128"]
        t = site.json("trace", "--src", laptop["tunnel_ipv4"], "--dst", APP_WEB, "--dport", "8080")
        assert t["identity"]["device"] == "alice-tablet"
    finally:
        restore = site.tmp / "identities.yaml"
        restore.write_text(original)
        site.ztgate("policy", "apply", LAB / "policy.yaml", "--identities", restore)
    assert wait_until(lambda: site.tcp(APP_WEB, 8080, timeout=1), timeout=30, what="alice back")


def test_connectors_and_routes_are_managed_and_checked(site, alice):
    """A connector's interface carries the connector-side program before it has a peer; routes go
    into ztgate's own table and the peer's allowed IPs; bad requests change nothing."""
    name = f"t{site.ns.token[:6]}"
    ifname = f"ztc-{name}"
    added = site.json("connector", "add", name)
    assert added["interface"] == ifname and added["listen_port"] == 51821
    assert "private_key:" in added["config"] and "gateway_endpoint: 198.18.0.1:51821" in added["config"]
    (conn,) = site.json("status")["connectors"]
    assert conn["name"] == name and conn["reply_program"]
    assert site.ns.run("gw", "ip", "link", "show", ifname).returncode == 0

    before = site.json("status")["generation"]
    cases = [
        (("connector", "add", name), "exists already"),
        (("connector", "add", "Bad_Name"), "must match"),
        (("connector", "add", "other", "--port", "51821"), "taken"),
        (("route", "add", "10.30.0.1/16", "--connector", name), "host bits"),
        (("route", "add", "10.30.0.0/16", "--connector", "nope"), "no connector named"),
        (("route", "add", "100.96.0.0/16", "--connector", name), "overlaps the device pool"),
        (("route", "add", "10.20.5.0/24", "--connector", name), "routes through this host itself"),
        (("route", "remove", "10.40.0.0/16"), "no route for"),
    ]
    for args, what in cases:
        r = site.ztgate(*args, check=False)
        assert r.returncode == 2 and what in r.stderr, (args, r.stderr)
    assert site.json("status")["generation"] == before

    site.ztgate("route", "add", "10.30.0.0/16", "--connector", name)
    site.ztgate("route", "add", "fd30::/64", "--connector", name)
    r = site.ztgate("route", "add", "10.30.128.0/17", "--connector", name, check=False)
    assert r.returncode == 2 and "overlaps 10.30.0.0/16" in r.stderr
    assert [(x["prefix"], x["installed"]) for x in site.json("route", "list")] == [("10.30.0.0/16", True),
                                                                                    ("fd30::/64", True)]
    table = site.ns.run("gw", "ip", "route", "show", "table", "51820").stdout
    assert f"10.30.0.0/16 dev {ifname}" in table and "unreachable default" in table
    rules = site.ns.run("gw", "ip", "rule").stdout
    assert f"iif {site.iface} lookup 51820" in rules and f"to 10.20.0.0/16 iif {site.iface} lookup main" in rules
    (peer,) = site.json("connector", "list")
    assert peer["routes"] == ["10.30.0.0/16", "fd30::/64"]
    allowed = site.ns.run("gw", "wg", "show", ifname, "allowed-ips").stdout
    assert "10.30.0.0/16" in allowed and "fd30::/64" in allowed

    # A restarted controller puts it all back from the store: table, rules, peer, program.
    site.ns.run("gw", "ip", "route", "flush", "table", "51820")
    site.ns.run("gw", "ip", "rule", "del", "iif", site.iface, "lookup", "51820")
    site.kill()
    site.start()
    table = site.ns.run("gw", "ip", "route", "show", "table", "51820").stdout
    assert f"10.30.0.0/16 dev {ifname}" in table and "unreachable default" in table
    assert f"iif {site.iface} lookup 51820" in site.ns.run("gw", "ip", "rule").stdout
    assert "10.30.0.0/16" in site.ns.run("gw", "wg", "show", ifname, "allowed-ips").stdout
    (conn,) = site.json("status")["connectors"]
    assert conn["reply_program"]        # the new build's, attached again at start
    # a device enrolled now gets the connector's routes in its configuration
    conf = site.ztgate("device", "add", f"late-{name}", "--user", "alice@example.com").stdout
    assert "10.30.0.0/16" in conf and "fd30::/64" in conf and "10.20.0.0/16" in conf
    site.ztgate("device", "remove", f"late-{name}")

    r = site.ztgate("connector", "remove", name, check=False)
    assert r.returncode == 2 and "remove those routes first" in r.stderr
    site.ztgate("route", "remove", "10.30.0.0/16")
    site.ztgate("route", "remove", "fd30::/64")
    assert "10.30.0.0/16" not in site.ns.run("gw", "ip", "route", "show", "table", "51820").stdout
    site.ztgate("connector", "remove", name)
    assert site.ns.run("gw", "ip", "link", "show", ifname, check=False).returncode != 0
    assert site.json("connector", "list") == []


def test_forwarding_settings_are_put_back():
    """What `connector run` turns on for a LAN interface it did not make (forwarding, and
    rp_filter for a connector interface) is put back as it was when it stops; what was on
    already is left alone."""
    from control import routes

    with Namespaces("ztfw") as ns:
        ns.add("c")
        lan, other = ns.ifname("lan"), ns.ifname("lan")
        ns.run("c", "ip", "link", "add", lan, "type", "veth", "peer", "name", other)
        ns.run("c", "sysctl", "-qw", f"net.ipv4.conf.{other}.forwarding=1", f"net.ipv4.conf.{lan}.rp_filter=2")
        with ns.inside("c"):
            def values(name: str) -> dict:
                paths = [routes.PROC / "ipv4/conf" / name / k for k in ("forwarding", "rp_filter")]
                paths.append(routes.PROC / "ipv6/conf" / name / "force_forwarding")   # (Linux >= 6.17)
                return {p.name: p.read_text().strip() for p in paths if p.exists()}

            before = values(lan), values(other)
            assert (before[0]["forwarding"], before[0]["rp_filter"], before[1]["forwarding"]) == ("0", "2", "1")
            changed = routes.enable_forwarding(lan, connector=True) + routes.enable_forwarding(other)
            assert (values(lan)["forwarding"], values(lan)["rp_filter"]) == ("1", "0")
            assert all(v == "1" for k, v in values(other).items() if k != "rp_filter")
            assert not any(p.parent.name == other and p.name == "forwarding" for p, _ in changed)  # it was on
            routes.restore_settings(changed)
            assert (values(lan), values(other)) == before
