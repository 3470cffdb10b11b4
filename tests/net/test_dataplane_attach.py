"""`ztgate dataplane attach` / `detach`: the engine alone in a forwarding path, no daemon.
Real TCP and UDP from allowed, blocked and unknown sources cross a forwarding namespace whose
ingress veth carries the engine; what arrives must be what the reference evaluator allows.
Attaching again with another policy changes what arrives (flows included) in one step;
detaching leaves the interface and bpffs clean. The CLI runs as a process of its own in the
forwarding namespace, as an operator would run it.

    cl namespace                        fw namespace                       sv namespace
    100.96.0.2 ann, .3 bob, .9 nobody   engine on fw's cl-side veth         10.20.0.10 tcp 22, 443
    198.18.5.1 <------- veth -------> 198.18.5.254   198.18.6.254 <-- veth --> 198.18.6.1  udp 53, 5000
"""
from __future__ import annotations

import ipaddress
import json
import select
import socket
import time
from pathlib import Path

import pytest
import yaml

from control.files import load_identities, load_policy
from control.model import TCP, UDP, Packet
from control.reference import decide
from dataplane import standalone
from dataplane.attach import attach, attached
from dataplane.libbpf import unpin_all
from tests.netns import REPO, Namespaces

ZTGATE = str(REPO / ".venv" / "bin" / "ztgate")
SERVER = "10.20.0.10"
SOURCES = {"ann": "100.96.0.2", "bob": "100.96.0.3", "nobody": "100.96.0.9"}
SERVICES = [(TCP, 22), (TCP, 443), (UDP, 53), (UDP, 5000)]
WAIT = 1.0          # an allowed SYN or datagram arrives in milliseconds; a dropped one never does

IDENTITIES = {"users": [{"email": "ann@example.com", "groups": ["admins"]},
                        {"email": "bob@example.com", "groups": ["staff"]}],
              "devices": [{"name": "ann-laptop", "user": "ann@example.com", "tunnel_ipv4": SOURCES["ann"]},
                          {"name": "bob-laptop", "user": "bob@example.com", "tunnel_ipv4": SOURCES["bob"]}]}
POLICY_A = {"default_action": "block", "rules": [
    {"name": "ssh-admins", "precedence": 10, "action": "allow", "principals": ["group:admins"],
     "protocols": ["tcp"], "destination": {"cidrs": [f"{SERVER}/32"], "ports": [22]}},
    {"name": "web", "precedence": 20, "action": "allow", "protocols": ["tcp"], "destination": {"ports": [443]}},
    {"name": "dns-bob", "precedence": 30, "action": "allow", "principals": ["user:bob@example.com"],
     "protocols": ["udp"], "destination": {"ports": [53]}}]}
POLICY_B = {"default_action": "allow", "rules": [
    {"name": "ssh-staff", "precedence": 10, "action": "allow", "principals": ["group:staff"],
     "protocols": ["tcp"], "destination": {"ports": [22]}},
    {"name": "no-ssh", "precedence": 15, "action": "block", "protocols": ["tcp"], "destination": {"ports": [22]}},
    {"name": "no-web", "precedence": 20, "action": "block", "destination": {"cidrs": ["10.20.0.0/24"], "ports": [443]}},
    {"name": "no-udp-5000", "precedence": 30, "action": "block", "protocols": ["udp"],
     "destination": {"ports": [5000]}}]}


@pytest.fixture
def path(tmp_path):
    """Namespaces, servers and the policy files; the engine's pins go afterwards, also on failure."""
    with Namespaces("ztdp") as ns:
        for name in ("cl", "fw", "sv"):
            ns.add(name)
        fw_in, cl_if = ns.veth("fw", "cl", "198.18.5.254/24", "198.18.5.1/24")
        ns.veth("fw", "sv", "198.18.6.254/24", "198.18.6.1/24")
        ns.run("fw", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for addr in SOURCES.values():
            ns.run("cl", "ip", "addr", "add", f"{addr}/32", "dev", cl_if)
        ns.run("cl", "ip", "route", "add", "10.20.0.0/16", "via", "198.18.5.254")
        ns.run("fw", "ip", "route", "add", "100.96.0.0/12", "via", "198.18.5.1")
        ns.run("sv", "ip", "addr", "add", f"{SERVER}/32", "dev", "lo")
        ns.run("sv", "ip", "route", "add", "100.96.0.0/12", "via", "198.18.6.254")
        ns.run("fw", "ip", "route", "add", "10.20.0.0/16", "via", "198.18.6.1")
        files = {}
        for name, doc in (("identities", IDENTITIES), ("a", POLICY_A), ("b", POLICY_B)):
            files[name] = tmp_path / f"{name}.yaml"
            files[name].write_text(yaml.safe_dump(doc))
        with ns.inside("fw"):
            pins = standalone.pin_dir(fw_in)
        try:
            yield ns, fw_in, files, pins
        finally:
            unpin_all(pins)


def ztgate(ns, *args) -> tuple[int, str, str]:
    r = ns.run("fw", ZTGATE, *map(str, args), check=False, timeout=120)
    return r.returncode, r.stdout, r.stderr


def attach_files(ns, ifname, files, policy, *extra) -> dict:
    code, out, err = ztgate(ns, "dataplane", "attach", ifname, "--policy", files[policy],
                            "--identities", files["identities"], "--json", *extra)
    assert code == 0, err
    return json.loads(out)


class Servers:
    """Listening TCP and bound UDP sockets in sv; what arrived, as (source, proto, port)."""

    def __init__(self, ns):
        self.tcp, self.udp = {}, {}
        for proto, port in SERVICES:
            if proto == TCP:
                s = ns.socket("sv", socket.SOCK_STREAM)
                s.bind((SERVER, port))
                s.listen(64)
                s.setblocking(False)
                self.tcp[port] = s
            else:
                s = ns.socket("sv", socket.SOCK_DGRAM)
                s.bind((SERVER, port))
                s.setblocking(False)
                self.udp[port] = s
        self.accepted = []

    def arrived(self) -> set:
        got = set()
        for port, s in self.tcp.items():
            while True:
                try:
                    conn, (src, _) = s.accept()
                except BlockingIOError:
                    break
                self.accepted.append(conn)
                got.add((src, TCP, port))
        for port, s in self.udp.items():
            while True:
                try:
                    _, (src, _) = s.recvfrom(2048)
                except BlockingIOError:
                    break
                got.add((src, UDP, port))
        return got


def send_all(ns, round_: int) -> dict:
    """A SYN (a connect) and a datagram from every source to every service; client TCP sockets
    by (source, port), to use their flows later."""
    clients = {}
    for who, src in SOURCES.items():
        for i, (proto, port) in enumerate(SERVICES):
            sport = 20000 + 100 * round_ + 10 * list(SOURCES).index(who) + i
            if proto == TCP:
                s = ns.socket("cl", socket.SOCK_STREAM)
                s.setblocking(False)
                s.bind((src, sport))
                s.connect_ex((SERVER, port))
                clients[(src, port)] = s
            else:
                s = ns.socket("cl", socket.SOCK_DGRAM)
                s.bind((src, sport))
                s.sendto(b"probe", (SERVER, port))
    return clients


def expected(files, policy) -> set:
    pol, ids = load_policy(files[policy]), load_identities(files["identities"])
    return {(src, proto, port) for src in SOURCES.values() for proto, port in SERVICES
            if decide(pol, ids, Packet(ipaddress.ip_address(src), ipaddress.ip_address(SERVER), proto,
                                       30000, port)).verdict == "allow"}


def test_attach_replace_detach_on_real_traffic(path):
    ns, ifname, files, pins = path
    servers = Servers(ns)

    first = attach_files(ns, ifname, files, "a", "--mode", "native")
    assert (first["mode"], first["frames"], first["replaced"]) == ("native", "ethernet", None)
    with ns.inside("fw"):
        assert attached(ifname) == (first["program"], "native")
    assert (pins / "prog").exists() and (pins / "zt_ct").exists()
    clients = send_all(ns, 1)
    time.sleep(WAIT)
    want_a = expected(files, "a")
    assert servers.arrived() == want_a
    assert (SOURCES["ann"], TCP, 22) in want_a and (SOURCES["bob"], UDP, 53) in want_a   # the rules are live
    ssh = clients[(SOURCES["ann"], 22)]          # a connection policy A allows and policy B does not
    assert select.select([], [ssh], [], 0)[1] and ssh.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0

    # A replacement in another mode cannot be one step: refused, nothing changed.
    code, _, err = ztgate(ns, "dataplane", "attach", ifname, "--policy", files["b"], "--identities",
                          files["identities"], "--mode", "generic")
    assert code == 2 and "cannot be one step" in err
    with ns.inside("fw"):
        assert attached(ifname) == (first["program"], "native")

    second = attach_files(ns, ifname, files, "b")
    assert (second["mode"], second["replaced"]) == ("native", first["program"])
    with ns.inside("fw"):
        assert attached(ifname) == (second["program"], "native")
    send_all(ns, 2)
    ssh.send(b"after the change")     # ann's open flow: decided again by policy B, which blocks it
    time.sleep(WAIT)
    want_b = expected(files, "b")
    assert want_b != want_a and servers.arrived() == want_b
    server_side = servers.accepted[0]
    assert server_side.getpeername()[0] == SOURCES["ann"]
    server_side.setblocking(False)
    with pytest.raises(BlockingIOError):
        server_side.recv(100)

    code, out, err = ztgate(ns, "dataplane", "detach", ifname)
    assert code == 0 and f"detached program {second['program']}" in out, err
    with ns.inside("fw"):
        assert attached(ifname) is None
    assert not pins.exists()
    send_all(ns, 3)
    time.sleep(0.3)
    everything = {(src, proto, port) for src in SOURCES.values() for proto, port in SERVICES}
    assert servers.arrived() == everything     # no program left: plain forwarding
    code, out, _ = ztgate(ns, "dataplane", "detach", ifname)
    assert code == 0 and "no engine was attached" in out


def test_refuses_a_gateways_interface(path, program):
    """An interface whose XDP program the engine did not attach (a gateway's): attach and
    detach refuse with status 2 and leave its program in place."""
    ns, ifname, files, pins = path
    with ns.inside("fw"):
        attach(program, ifname, "native")
    for args in (("attach", ifname, "--policy", files["a"], "--identities", files["identities"]),
                 ("detach", ifname)):
        code, _, err = ztgate(ns, "dataplane", *args)
        assert code == 2 and "a ztgate gateway's interface" in err, err
        with ns.inside("fw"):
            assert attached(ifname) == (program.id, "native")
    assert not pins.exists()


def test_ip_first_interface(path):
    """A TUN device (as wireguard-go makes): frames from the IP header, generic XDP (native
    refused, leaving nothing behind)."""
    ns, _, files, _ = path
    ns.run("fw", "ip", "tuntap", "add", "dev", "zttun0", "mode", "tun")
    with ns.inside("fw"):
        pins = standalone.pin_dir("zttun0")
    try:
        # native XDP: a TUN device has none; the failed attach leaves no program and no pins
        code, _, err = ztgate(ns, "dataplane", "attach", "zttun0", "--policy", files["a"],
                              "--identities", files["identities"], "--mode", "native")
        assert code == 1 and "cannot attach XDP (native) to zttun0" in err, err
        with ns.inside("fw"):
            assert attached("zttun0") is None
        assert not Path(pins).exists()
        done = attach_files(ns, "zttun0", files, "a")
        assert (done["frames"], done["mode"]) == ("ip", "generic")
        code, _, err = ztgate(ns, "dataplane", "detach", "zttun0")
        assert code == 0, err
        with ns.inside("fw"):
            assert attached("zttun0") is None
        assert not Path(pins).exists()
    finally:
        unpin_all(pins)
