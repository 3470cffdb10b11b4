r"""The lab end to end (spec/LAB.md): `ztgate lab up` once for the module, then real traffic
from the device namespaces through the real WireGuard tunnels, the gateway's XDP programs and
the connector to the services on zt-app, all driven through the `ztgate` CLI; at the end
`ztgate lab down`, and the host must be clean.

    zt-alice 100.96.0.2 --\                                   zt-app 10.20.0.10 tcp 22, 8080; udp 5353
                           >-- zt-gw (XDP) <== tunnel == zt-conn --- 10.20.0.11 tcp 3389
    zt-bob   100.96.0.3 --/      198.18.0.1              198.18.0.20

What each device may reach is never written here: the expected verdict of every case comes
from the reference evaluator (control/reference.py) run on the policy and identities the
lab's gateway reports, and the test asserts that the traffic agrees with it.

Sockets are opened inside a namespace by this process itself (setns for this thread, then
back, as tests/netns.py does): a socket stays in the namespace it was made in, and nothing
is started per probe. The lab's names come from lab/lab.py; the lab is global on the host,
so this module must not run twice at the same time.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path

import jwt
import pytest
import yaml

from control.config import socket_path
from control.files import parse_policy
from lab.lab import DEVICES, NS_ALICE, NS_APP, NS_BOB, NS_CONN, NS_GW, PIN_DIR, RUN, UNDERLAY, WG_IFACES
from tests.lab_cli import Reference, cli, cli_json, flow_events, metric, metrics
from tests.lab_traffic import (APP, RDP, Sniffer, bound, echo, http_page, http_request, icmp_echo, ns_socket,
                               open_echo, udp_echo)
from tests.netns import REPO, wait_until

GW_UNDERLAY, CONN_UNDERLAY = UNDERLAY[NS_GW], UNDERLAY[NS_CONN]
NS_OF = {name: ns for name, _, ns, _ in DEVICES}            # device name -> its namespace
IFACE_OF = {name: ifname for name, _, _, ifname in DEVICES}  # device name -> its WireGuard interface
CASES = [("tcp", APP, 22), ("tcp", APP, 8080), ("udp", APP, 5353), ("icmp", APP, None), ("tcp", RDP, 3389)]


# ---------------------------------------------------------------------------------------------
# reachability, decided by the reference

def test_the_lab_runs_the_demo_policy_and_identities(up):
    """The gateway holds examples/lab/policy.yaml and the users of spec/LAB.md: the reference
    below is asked about that policy, not about whatever the gateway happens to hold."""
    shipped = parse_policy(yaml.safe_load((REPO / "examples" / "lab" / "policy.yaml").read_text()))
    assert up.policy == shipped
    groups = {u.key: set(u.groups) for u in up.identities.users}
    assert groups == {"alice@example.com": {"developers", "staff"}, "bob@example.com": {"staff"}}
    assert up.address == {"alice-laptop": "100.96.0.2", "bob-laptop": "100.96.0.3"}
    assert up.user == {"alice-laptop": "alice@example.com", "bob-laptop": "bob@example.com"}


@pytest.mark.parametrize("device", [d[0] for d in DEVICES])
@pytest.mark.parametrize("proto,dst,port", CASES, ids=[f"{p}-{d}-{n}" if n else f"{p}-{d}" for p, d, n in CASES])
def test_reachability_follows_the_reference(up, device, proto, dst, port):
    """One probe with real traffic: the answer must come back exactly when the reference allows
    the packet, and an answer must name the device's own tunnel address."""
    ns, me = NS_OF[device], up.address[device]
    if proto == "icmp":
        icmp_drops = lambda: [e for e in flow_events("--device", device, "--verdict", "block")
                              if e["proto"] == "icmp" and e["dst"] == dst]
        dropped_before = len(icmp_drops())
        expected = up.decide(device, proto, dst)
        reached = icmp_echo(ns, dst)
    elif proto == "udp":
        s, sport = bound(ns, socket.SOCK_DGRAM)
        expected = up.decide(device, proto, dst, port, sport)
        reached = udp_echo(ns, dst, port, s)
    elif port == 8080:
        s, sport = bound(ns)
        expected = up.decide(device, proto, dst, port, sport)
        page = http_page(ns, dst, port, s)
        reached = page is not None
        assert page in (None, f"ztgate lab app {APP}:8080, you are {me}\n")
    else:
        s, sport = bound(ns)
        expected = up.decide(device, proto, dst, port, sport)
        conn = open_echo(ns, dst, port, me, s=s)
        reached = conn is not None
        if conn:
            with conn:
                assert echo(conn), "connected, but the echo did not come back"
    assert expected.verdict in ("allow", "block")
    assert reached == (expected.verdict == "allow"), \
        f"{device} {proto} {dst}:{port}: the reference says {expected}; it got {'an' if reached else 'no'} answer"
    if proto == "icmp" and not reached:
        # Not a lost packet: the gateway decided it (the flow log has its drop, for this device).
        wait_until(lambda: len(icmp_drops()) > dropped_before, timeout=5,
                   what=f"a flow event for {device}'s ICMP drop")


def test_allowed_icmp_gets_its_echo_reply(up):
    """An allow rule for ICMP (spec/POLICY.md: protocols tcp, udp, icmp) lets a device's ping
    through and its reply back. The rule is added for the test and removed after it."""
    cli("rule", "add", "t-alice-icmp", "--action", "allow", "--principal", "user:alice@example.com",
        "--proto", "icmp", "--dst-cidr", f"{APP}/32", "--precedence", "60")
    try:
        expected = Reference().decide("alice-laptop", "icmp", APP)
        assert (expected.verdict, expected.rule) == ("allow", "t-alice-icmp")
        reached = icmp_echo(NS_ALICE, APP)
        assert reached, "the echo request is allowed, but its reply never came back to the device"
    finally:
        cli("rule", "remove", "t-alice-icmp")


# ---------------------------------------------------------------------------------------------
# changes decide new flows at once, and open flows too

def test_a_new_rule_decides_new_flows_within_a_second(up):
    bob = up.address["bob-laptop"]
    assert up.decide("bob-laptop", "tcp", APP, 22).verdict == "block"
    assert open_echo(NS_BOB, APP, 22, bob) is None
    cli("rule", "add", "bob-ssh", "--action", "allow", "--principal", "user:bob@example.com", "--proto", "tcp",
        "--dst-cidr", f"{APP}/32", "--dst-port", "22", "--precedence", "50")
    try:
        returned = time.monotonic()
        # Fresh connections with a short wait each (a dropped SYN would otherwise be retried
        # only after TCP's one-second backoff), until one second after the CLI returned.
        conn = None
        while conn is None and time.monotonic() < returned + 1.0:
            conn = open_echo(NS_BOB, APP, 22, bob, timeout=0.2)
        took = time.monotonic() - returned
        assert conn is not None, "bob did not reach :22 within 1 s of `rule add` returning"
        with conn:
            assert echo(conn)
        assert Reference().decide("bob-laptop", "tcp", APP, 22).rule == "bob-ssh"
        print(f"bob reached :22 {took:.3f} s after rule add returned")
    finally:
        cli("rule", "remove", "bob-ssh")
    assert open_echo(NS_BOB, APP, 22, bob) is None, "bob still reaches :22 after the rule was removed"


def test_a_block_rule_cuts_an_open_connection(up):
    alice = up.address["alice-laptop"]
    conn = open_echo(NS_ALICE, APP, 22, alice)
    assert conn is not None and echo(conn)
    try:
        cli("rule", "add", "t-cut-alice", "--action", "block", "--principal", "user:alice@example.com",
            "--proto", "tcp", "--dst-cidr", f"{APP}/32", "--dst-port", "22", "--precedence", "1")
        assert Reference().decide("alice-laptop", "tcp", APP, 22).rule == "t-cut-alice"
        assert not echo(conn), "the open connection still echoes after the block rule"
        assert open_echo(NS_ALICE, APP, 22, alice) is None
        assert udp_echo(NS_ALICE, APP, 5353), "the block rule also cut what it does not name"
    finally:
        conn.close()
        cli("rule", "remove", "t-cut-alice")
    again = wait_until(lambda: open_echo(NS_ALICE, APP, 22, alice), timeout=5, what="alice back on :22")
    with again:
        assert echo(again)


def test_flows_lists_an_open_connection_and_kill_ends_it(up):
    alice = up.address["alice-laptop"]
    conn = open_echo(NS_ALICE, APP, 22, alice)
    assert conn is not None and echo(conn)
    try:
        sport = conn.getsockname()[1]
        mine = [f for f in cli_json("flows", "--user", "alice@example.com") if f["sport"] == sport]
        assert len(mine) == 1, mine
        f = mine[0]
        assert (f["proto"], f["src"], f["dst"], f["dport"], f["device"], f["rule"], f["state"]) == (
            "tcp", alice, APP, 22, "alice-laptop", Reference().decide("alice-laptop", "tcp", APP, 22).rule, "open")
        assert f["packets"] >= 3 and f["reply_packets"] >= 3 and f["bytes"] > 0 and f["reply_bytes"] > 0
        assert all(x["user"] == "alice@example.com" for x in cli_json("flows", "--user", "alice@example.com"))

        bad = cli("flows", "kill", "tcp", f"{alice}:{sport}", f"{APP}:23", check=False)
        assert bad.returncode == 2 and "no tracked tcp flow" in bad.stderr
        cli("flows", "kill", "tcp", f"{alice}:{sport}", f"{APP}:22")
        assert not echo(conn), "a killed flow still echoes"
        (killed,) = [x for x in cli_json("flows") if x["sport"] == sport]
        assert killed["state"] == "killed"
        events = [e for e in flow_events("--user", "alice@example.com") if e.get("sport") == sport]
        assert any(e["reason"] == "killed" and e["verdict"] == "block" for e in events), events
        assert cli_json("audit", "--limit", "1")[0]["what"] == "flow kill"
    finally:
        conn.close()
    again = open_echo(NS_ALICE, APP, 22, alice)      # a new connection is decided by the policy
    assert again is not None
    with again:
        assert echo(again)
        # Every flow of one device at once (it stays enrolled); another user's are left alone.
        assert http_page(NS_BOB, APP, 8080) is not None
        assert cli_json("flows", "--user", "bob@example.com")
        for args, what in ((("flows", "kill"), "give a flow"),
                           (("flows", "kill", "--device", "nobody"), "no device named"),
                           (("flows", "kill", "tcp", f"{alice}:1", f"{APP}:22", "--device", "alice-laptop"), "not both")):
            r = cli(*args, check=False)
            assert r.returncode == 2 and what in r.stderr, (args, r.stderr)
        assert "flows of alice-laptop killed" in cli("flows", "kill", "--device", "alice-laptop").stdout
        assert not echo(again), "a killed flow still echoes"
        assert {f["state"] for f in cli_json("flows", "--device", "alice-laptop")} == {"killed"}
        assert "killed" not in {f["state"] for f in cli_json("flows", "--user", "bob@example.com")}
        (note,) = cli_json("audit", "--limit", "1")
        assert note["what"] == "flow kill" and note["detail"]["device"] == "alice-laptop"
    third = open_echo(NS_ALICE, APP, 22, alice)
    assert third is not None
    with third:
        assert echo(third)


@pytest.mark.parametrize("device", [d[0] for d in DEVICES])
def test_large_datagrams_pass_whole_when_allowed_and_not_at_all_when_not(up, device):
    """4000 bytes of UDP: fragmented by the device (the tunnel's MTU is 1420) and, for the echo,
    by the LAN and the connector. Its later fragments follow the first's verdict, both ways."""
    ns = NS_OF[device]
    s, sport = bound(ns, socket.SOCK_DGRAM)
    want = Reference().decide(device, "udp", APP, 5353, sport=sport).verdict == "allow"
    before = metric(metrics(), "ztgate_packets_total", reason="fragment-follows")
    payload = secrets.token_bytes(4000)
    try:
        s.sendto(payload, (APP, 5353))
        try:
            got = s.recv(8192)
        except socket.timeout:
            got = None
    finally:
        s.close()
    assert (got == payload) == want, f"{device}: a {len(payload)}-byte echo {'came' if got else 'did not come'} back"
    grew = metric(metrics(), "ztgate_packets_total", reason="fragment-follows") - before
    assert (grew >= 4) == want, grew      # at least 2 later fragments each way when allowed; none when not


def test_a_disabled_device_is_cut_at_once_and_comes_back_when_enabled(up):
    bob, alice = up.address["bob-laptop"], up.address["alice-laptop"]
    web = ns_socket(NS_BOB)
    web.connect((APP, 8080))                 # open (the handshake went both ways), no request yet
    other = open_echo(NS_ALICE, APP, 22, alice)
    assert other is not None
    try:
        cli("device", "disable", "bob-laptop")
        assert http_request(web) is None, "bob's open connection still answers after device disable"
        assert http_page(NS_BOB, APP, 8080) is None
        assert echo(other), "disabling bob's laptop cut alice's connection"
        trace = cli_json("trace", "--src", bob, "--dst", APP, "--dport", "8080")
        assert trace["kernel"]["verdict"] == trace["reference"]["verdict"] == "unknown"
    finally:
        web.close()
        other.close()
        cli("device", "enable", "bob-laptop")
    # Disabling left bob's peer on the gateway admitting no address, with its session: enabling
    # gives the addresses back, and he is back at once (a removed peer's session would be gone,
    # and his laptop would notice only after ~15 s of unanswered packets).
    enabled = time.monotonic()
    page = wait_until(lambda: http_page(NS_BOB, APP, 8080), timeout=5, interval=0.2,
                      what="bob's page after device enable")
    assert page == f"ztgate lab app {APP}:8080, you are {bob}\n"
    print(f"bob back {time.monotonic() - enabled:.1f} s after device enable")


# ---------------------------------------------------------------------------------------------
# identity: no device speaks as another, nothing bypasses the gateway

def test_a_device_cannot_speak_as_another(up):
    """alice's laptop sends UDP to the echo service with bob's tunnel address and with an
    address no device has, straight onto her WireGuard interface: neither reaches the app;
    the same packet with her own address does."""
    from scapy.layers.inet import IP, UDP as UdpLayer

    sources = {"bob": up.address["bob-laptop"], "nobody": "100.96.0.77", "alice": up.address["alice-laptop"]}
    assert up.decide("alice-laptop", "udp", APP, 5353).verdict == "allow"     # the control may pass
    sniffer = Sniffer(NS_APP)
    raw = ns_socket(NS_ALICE, socket.SOCK_RAW, socket.IPPROTO_RAW)     # IP_HDRINCL: we write the header
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, IFACE_OF["alice-laptop"].encode())
    tokens = {who: f"spoof-{who}-{secrets.token_hex(4)}".encode() for who in sources}
    try:
        for _ in range(3):
            for who, src in sources.items():
                pkt = IP(src=src, dst=APP) / UdpLayer(sport=40000 + len(who), dport=5353) / tokens[who]
                raw.sendto(bytes(pkt), (APP, 0))
        seen = sniffer.packets(wait=1.5)
    finally:
        raw.close()
        sniffer.close()
    arrived = {who for who, token in tokens.items() for src, dst, _, frame in seen if token in frame and dst == APP}
    assert "alice" in arrived, "the control packet (alice's own address) did not arrive: the probe is broken"
    assert arrived == {"alice"}, f"packets with a forged source reached the app: {sorted(arrived - {'alice'})}"


@pytest.mark.parametrize("via", [GW_UNDERLAY, CONN_UNDERLAY], ids=["via-gateway", "via-connector"])
def test_the_underlay_cannot_reach_the_private_network(up, intruder, via):
    subprocess.run(["ip", "-n", intruder, "route", "replace", "10.20.0.0/16", "via", via], check=True,
                   capture_output=True, timeout=30)
    # The control: the intruder does reach the host it routes through (a refused connection
    # is an answer), so a failure below is the gateway's or connector's doing, not the wiring's.
    s = ns_socket(intruder)
    with pytest.raises(ConnectionRefusedError):
        s.connect((via, 9))
    s.close()
    sniffer = Sniffer(NS_APP)
    try:
        assert http_page(intruder, APP, 8080) is None, f"the underlay reached {APP}:8080 via {via}"
        u = ns_socket(intruder, socket.SOCK_DGRAM)
        assert not udp_echo(intruder, APP, 5353, u)
        seen = [p for p in sniffer.packets(wait=0.5) if p[0] == "198.18.0.99"]
    finally:
        sniffer.close()
    assert not seen, f"packets from the underlay reached zt-app via {via}: {[(p[0], p[1], p[2]) for p in seen]}"


def test_the_private_network_reaches_a_device_only_with_replies(up):
    """zt-app sends to alice's tunnel address (its default route is the connector) what is no
    reply to anything alice opened: nothing arrives, and the gateway logs and counts the drop."""
    alice = up.address["alice-laptop"]
    port = 41000 + secrets.randbelow(8000)
    udp_in = ns_socket(NS_ALICE, socket.SOCK_DGRAM, timeout=0.2)
    udp_in.bind((alice, port))
    tcp_in = ns_socket(NS_ALICE, timeout=0.2)
    tcp_in.bind((alice, port))
    tcp_in.listen(4)
    before = metric(metrics(), "ztgate_packets_total", reason="not-reply")
    sent = 0
    try:
        out, sport = bound(NS_APP, socket.SOCK_DGRAM)
        with out:
            for _ in range(3):
                out.sendto(b"unasked", (alice, port))
                sent += 1
        conn = ns_socket(NS_APP, timeout=1.2)
        with conn, pytest.raises(socket.timeout):
            conn.connect((alice, port))                 # one SYN at least
        sent += 1
        with pytest.raises(socket.timeout):
            udp_in.recvfrom(100)
        with pytest.raises(socket.timeout):
            tcp_in.accept()
    finally:
        udp_in.close()
        tcp_in.close()
    events = wait_until(lambda: [e for e in flow_events("--verdict", "block")
                                 if e["reason"] == "not-reply" and e["dst"] == alice and e["dport"] == port],
                        timeout=5, what="the not-reply drops in the flow log")
    assert {e["device"] for e in events} == {"alice-laptop"}
    assert {e["proto"] for e in events} == {"udp", "tcp"}
    assert all(e["src"] == APP for e in events)
    after = metric(metrics(), "ztgate_packets_total", reason="not-reply")
    assert after >= before + sent, f"not-reply counter {before} -> {after}, {sent} packets sent"
    # ... while a reply does go back: alice's own UDP echo round trip.
    assert udp_echo(NS_ALICE, APP, 5353)


# ---------------------------------------------------------------------------------------------
# what operators see

def test_flow_log_and_metrics_name_users_devices_and_rules(up):
    before = metrics()
    # Each connection's source port tells its events apart from everything else in the log.
    flows = []
    for device, port in (("alice-laptop", 22), ("alice-laptop", 8080), ("bob-laptop", 8080), ("bob-laptop", 22)):
        s, sport = bound(NS_OF[device])
        flows.append((device, port, sport, up.decide(device, "tcp", APP, port, sport)))
        if port == 8080:
            http_page(NS_OF[device], APP, port, s)
        else:
            _connect_quietly(s, APP, port)
    expected_rules = {(f[0], f[1]): (f[3].verdict, f[3].rule) for f in flows}
    assert {v for v, _ in expected_rules.values()} == {"allow", "block"}     # the cases cover both

    def logged():
        events = flow_events()
        found = {}
        for device, port, sport, _ in flows:
            mine = [e for e in events if e["sport"] == sport and e["dport"] == port and e["dst"] == APP]
            if not mine:
                return None
            found[(device, port)] = mine[0]
        return found
    found = wait_until(logged, timeout=5, what="flow events for every connection")
    for (device, port), e in found.items():
        assert (e["verdict"], e["rule"]) == expected_rules[(device, port)], e
        assert e["device"] == device and e["user"] == up.user[device], e
        assert e["src"] == up.address[device] and e["proto"] == "tcp", e
        assert e["reason"] == ("rule" if e["rule"] else "default"), e
    # The file itself holds the same lines `ztgate logs` shows.
    in_file = [json.loads(line) for line in (RUN / "flows.log").read_text().splitlines() if line.strip()]
    for e in found.values():
        assert e in in_file
    # --user filters by the user.
    assert {e["user"] for e in flow_events("--user", "bob@example.com")} == {"bob@example.com"}

    after = metrics()
    for verdict, rule in set(expected_rules.values()):
        name = rule or "(default)"
        grew = metric(after, "ztgate_rule_packets_total", rule=name, verdict=verdict) - \
            metric(before, "ztgate_rule_packets_total", rule=name, verdict=verdict)
        assert grew > 0, f"ztgate_rule_packets_total{{rule={name!r},verdict={verdict!r}}} did not grow"
    assert metric(after, "ztgate_devices_online") == 2


def _connect_quietly(s: socket.socket, dst: str, port: int) -> None:
    """Connect and close (a blocked connection times out): traffic for the flow log."""
    try:
        s.connect((dst, port))
    except socket.timeout:
        pass
    finally:
        s.close()


def test_metrics_count_passed_replies_as_passed_not_as_drops(up):
    """Replies the connector-side program lets through (reason "reply") are no drops:
    ztgate_drops_total is for "packets dropped before any rule is consulted"."""
    before = metrics()
    assert udp_echo(NS_ALICE, APP, 5353)
    after = metrics()
    assert metric(after, "ztgate_packets_total", reason="reply") > \
        metric(before, "ztgate_packets_total", reason="reply")
    assert metric(after, "ztgate_drops_total", reason="reply") == 0, \
        "ztgate_drops_total{reason=\"reply\"} counts the replies that were passed"


# ---------------------------------------------------------------------------------------------
# the lab's identity provider

def test_lab_token_is_an_id_token_of_the_lab_idp(up):
    """`ztgate lab token` prints a token the IdP in zt-idp signed: it verifies against the JWKS
    that the IdP serves over HTTPS (the lab's CA) to the gateway's namespace."""
    token = cli("lab", "token", "bob@example.com", "--groups", "staff,developers", "--ttl", "120").stdout.strip()
    jwks = subprocess.run(["nsenter", f"--net=/run/netns/{NS_GW}", "curl", "-sf", "--max-time", "5", "--cacert",
                           str(RUN / "ca.pem"), "https://198.18.0.30:8443/jwks"],
                          capture_output=True, text=True, timeout=10, check=True).stdout
    key = jwt.PyJWKSet.from_dict(json.loads(jwks))[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key, algorithms=["RS256"], audience="ztgate", issuer="https://198.18.0.30:8443")
    assert claims["email"] == "bob@example.com" and claims["groups"] == ["staff", "developers"]
    assert claims["exp"] - claims["iat"] == 120 and claims["email_verified"] is True
    assert cli_json("lab", "status")["idp"]["discovery_from_gateway"]


# up again changes nothing; down leaves nothing

def test_lab_up_again_is_idempotent(up):
    status = cli_json("status")
    pid = (RUN / "gateway.pid").read_text()
    r = cli("lab", "up", check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the lab is up already" in r.stdout
    again = cli_json("status")
    assert again["program_id"] == status["program_id"] and again["build"] == status["build"]
    assert again["generation"] == status["generation"]
    assert again["uptime_seconds"] >= status["uptime_seconds"]
    assert (RUN / "gateway.pid").read_text() == pid


def lab_processes() -> list[str]:
    """Live (not zombie) processes of the lab: its wireguard-go daemons, gateway, connector, services, IdP."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        line = " ".join(a.decode(errors="replace") for a in argv if a)
        if state == "Z":
            continue
        if (Path(argv[0].decode(errors="replace")).name == "wireguard-go" and len(argv) > 1
                and argv[1].decode(errors="replace") in WG_IFACES) \
                or (("gateway run" in line or "connector run" in line) and str(RUN) in line) \
                or "lab.services" in line or "lab.idp serve" in line:
            found.append(f"{entry}: {line}")
    return found


def test_lab_down_leaves_the_host_clean(lab):
    """Last in the module (later tests would bring the lab up again)."""
    r = cli("lab", "down", check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert not [line for line in left.splitlines() if line.startswith("zt-")], left
    assert not lab_processes()
    assert not Path(PIN_DIR).exists()
    assert not RUN.exists()
    assert not [name for name in WG_IFACES if Path(f"/var/run/wireguard/{name}.sock").exists()]
    assert not Path(socket_path()).exists()
    rules = subprocess.run(["ip", "rule"], capture_output=True, text=True, timeout=10).stdout
    assert not re.search(r"lookup 51820\b", rules), rules
    again = cli("lab", "down", check=False, timeout=60)          # down is idempotent too
    assert again.returncode == 0, again.stdout + again.stderr
