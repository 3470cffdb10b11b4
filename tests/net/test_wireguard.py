"""control/wireguard/ against a real wireguard-go, with real traffic, in namespaces.

    gw namespace                                 cl namespace
    gateway wg (ensure_interface)  <-- veth -->  client wg (wg-quick up, from client_config)
    198.18.100.1/24 fd5a:7467::1/64              198.18.100.2/32 fd5a:7467::2/128
    underlay 198.18.0.1/24                       underlay 198.18.0.2/24

The gateway side is driven by the module under test (this thread enters "gw" for the call);
the client side only by wg-quick reading the text client_config() wrote.
"""
import ipaddress
import os
import signal
import socket
import subprocess

import pytest

from control import wireguard
from control.errors import InputError, KernelError
from tests.netns import PYTHON, REPO, Namespaces, wait_until

GW_UNDER, CL_UNDER = "198.18.0.1", "198.18.0.2"
GW_TUN4, GW_TUN6 = "198.18.100.1", "fd5a:7467::1"
CL_TUN4, CL_TUN6 = "198.18.100.2", "fd5a:7467::2"
SPOOF4 = "198.18.100.3"
PORT = 51820
ROUTES = ["198.18.100.0/24", "fd5a:7467::/64"]
QUIET = 1.0         # seconds we wait to be sure a datagram does NOT arrive


class Lab:
    def __init__(self, ns, veths, gw_if, gw_private, gw_public, kind):
        self.ns, self.veths, self.gw_if, self.kind = ns, veths, gw_if, kind
        self.gw_private, self.gw_public = gw_private, gw_public

    def gw(self, fn, *args, **kwargs):
        """Call control.wireguard's FN as a controller running in the gw namespace would."""
        with self.ns.inside("gw"):
            return getattr(wireguard, fn)(*args, **kwargs)


@pytest.fixture(scope="module")
def lab():
    with Namespaces("ztwg") as ns:
        ns.add("gw")
        ns.add("cl")
        veths = ns.veth("gw", "cl", f"{GW_UNDER}/24", f"{CL_UNDER}/24")
        private, public = wireguard.generate_keypair()
        gw_if = ns.ifname("gw")
        with ns.inside("gw"):
            kind = wireguard.ensure_interface(gw_if, private, PORT,
                                              [ipaddress.ip_interface(f"{GW_TUN4}/24"),
                                               ipaddress.ip_interface(f"{GW_TUN6}/64")])
        yield Lab(ns, veths, gw_if, private, public, kind)


class Client:
    def __init__(self, name, private, public, conf):
        self.name, self.private, self.public, self.conf = name, private, public, conf


def wg_quick(lab, *args, check=True):
    env = dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION="wireguard-go")
    return lab.ns.run("cl", "wg-quick", *args, env=env, check=check)


@pytest.fixture
def client(lab, tmp_path):
    """A fresh client (new keys, new interface: no session left from another test), admitted
    by the gateway with its two addresses, up through wg-quick in the cl namespace."""
    private, public = wireguard.generate_keypair()
    name = lab.ns.ifname("c")                 # wg-quick: interface name = the file's stem
    conf = tmp_path / f"{name}.conf"
    conf.write_text(wireguard.client_config(private, [f"{CL_TUN4}/32", f"{CL_TUN6}/128"],
                                            lab.gw_public, f"{GW_UNDER}:{PORT}", ROUTES))
    conf.chmod(0o600)
    lab.gw("add_peer", lab.gw_if, public, [CL_TUN4, CL_TUN6])
    wg_quick(lab, "up", str(conf))
    yield Client(name, private, public, conf)
    wg_quick(lab, "down", str(conf), check=False)
    lab.gw("remove_peer", lab.gw_if, public)


def udp_pair(lab, src, dst, port, family=socket.AF_INET):
    """A server socket on DST:PORT in gw and a client socket bound to SRC in cl."""
    server = lab.ns.socket("gw", family=family, timeout=QUIET)
    server.bind((dst, port))
    sender = lab.ns.socket("cl", family=family, timeout=QUIET)
    sender.bind((src, 0))
    return server, sender


def arrives(server, sender, dst, port, payload):
    """Send PAYLOAD; the (data, source address) the server got, or None after QUIET s."""
    sender.sendto(payload, (dst, port))
    try:
        data, addr = server.recvfrom(4096)
        return data, addr[0]
    except socket.timeout:
        return None


# ------------------------------------------------------------------------------- keys

def test_keys_round_trip_and_bad_keys_are_input_errors():
    private, public = wireguard.generate_keypair()
    assert wireguard.public_key_of(private) == public
    assert wireguard.check_public_key(public) == public
    assert len(public) == 44 and public.endswith("=")
    for bad in ("", "abc", "not base64 at all!", public[:-2], public + "AAAA",
                "AAAA" * 11, public.replace("=", "")):
        with pytest.raises(InputError, match="44 characters of base64"):
            wireguard.check_public_key(bad)
    with pytest.raises(InputError):
        wireguard.public_key_of("x" * 44)
    # wg itself agrees on the public key
    assert subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                          check=True).stdout.strip() == public


def test_kernel_dump_parsing():
    """The netlink path cannot run here (no kernel WireGuard): at least check that a dump as
    pyroute2 decodes it becomes the same InterfaceState the userspace path gives."""
    from pyroute2.netlink.generic.wireguard import wgmsg

    private, public = wireguard.generate_keypair()
    _, peer = wireguard.generate_keypair()

    def allowed(fam, addr, mask):
        return {"attrs": [["WGALLOWEDIP_A_FAMILY", fam],
                          ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(fam, addr)],
                          ["WGALLOWEDIP_A_CIDR_MASK", mask]]}

    def dump(peer_attrs):
        m = wgmsg()
        m["cmd"], m["version"] = 0, 1
        m["attrs"] = [["WGDEVICE_A_IFNAME", "wg0"], ["WGDEVICE_A_PRIVATE_KEY", private],
                      ["WGDEVICE_A_LISTEN_PORT", PORT], ["WGDEVICE_A_PEERS", [{"attrs": peer_attrs}]]]
        m.encode()
        d = wgmsg(m.data)
        d.decode()
        return d

    first = dump([["WGPEER_A_PUBLIC_KEY", peer],
                  ["WGPEER_A_ENDPOINT", {"addr": CL_UNDER, "port": 4000}],
                  ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 5}],
                  ["WGPEER_A_RX_BYTES", 10], ["WGPEER_A_TX_BYTES", 20],
                  ["WGPEER_A_ALLOWEDIPS", [allowed(socket.AF_INET, CL_TUN4, 32)]]])
    # the kernel continues a peer's allowed IPs in the next message, under the same key
    second = dump([["WGPEER_A_PUBLIC_KEY", peer],
                   ["WGPEER_A_ALLOWEDIPS", [allowed(socket.AF_INET6, CL_TUN6, 128)]]])
    state = wireguard._parse_netlink([first, second])
    assert state.public_key == public and state.listen_port == PORT
    assert state.peers == [wireguard.PeerState(
        peer, f"{CL_UNDER}:4000",
        [ipaddress.ip_network(f"{CL_TUN4}/32"), ipaddress.ip_network(f"{CL_TUN6}/128")],
        1700000000, 10, 20)]


# --------------------------------------------------------------------- client config

def test_client_config_is_what_wg_quick_reads(lab, tmp_path):
    private, _ = wireguard.generate_keypair()
    text = wireguard.client_config(private, [f"{CL_TUN4}/32", f"{CL_TUN6}/128"], lab.gw_public,
                                   f"{GW_UNDER}:{PORT}", ROUTES, keepalive=25)
    conf = tmp_path / "ztstrip0.conf"
    conf.write_text(text)
    conf.chmod(0o600)
    stripped = lab.ns.run("cl", "wg-quick", "strip", str(conf)).stdout
    # what wg-quick hands to `wg setconf`: Address is wg-quick's own and is gone
    assert f"PrivateKey = {private}" in stripped
    assert f"PublicKey = {lab.gw_public}" in stripped
    assert f"Endpoint = {GW_UNDER}:{PORT}" in stripped
    assert f"AllowedIPs = {', '.join(ROUTES)}" in stripped
    assert "PersistentKeepalive = 25" in stripped
    assert "Address" not in stripped and f"Address = {CL_TUN4}/32, {CL_TUN6}/128" in text
    v6 = wireguard.client_config(private, [CL_TUN4], lab.gw_public, f"[{GW_TUN6}]:{PORT}", ROUTES, keepalive=0)
    assert f"Endpoint = [{GW_TUN6}]:{PORT}" in v6 and "PersistentKeepalive" not in v6
    assert f"Address = {CL_TUN4}/32" in v6


# ----------------------------------------------------------------- tunnel, traffic

def test_handshake_and_tcp_through_the_tunnel(lab, client):
    # (wg-quick's PersistentKeepalive may have brought about a handshake already)
    before = lab.gw("show", lab.gw_if).peer(client.public)
    assert sorted(map(str, before.allowed_ips)) == sorted([f"{CL_TUN4}/32", f"{CL_TUN6}/128"])

    listener = lab.ns.socket("gw", kind=socket.SOCK_STREAM, timeout=5)
    listener.bind((GW_TUN4, 7001))
    listener.listen(1)
    conn = lab.ns.socket("cl", kind=socket.SOCK_STREAM, timeout=5)
    conn.connect((GW_TUN4, 7001))          # the first packet sets off the handshake
    served, (peer_addr, _) = listener.accept()
    served.settimeout(5)
    assert peer_addr == CL_TUN4            # the gateway sees the client's tunnel address
    conn.sendall(b"hello gateway")
    assert served.recv(100) == b"hello gateway"
    served.sendall(b"hello client")
    assert conn.recv(100) == b"hello client"

    after = lab.gw("show", lab.gw_if).peer(client.public)
    assert after.last_handshake > 0
    assert after.rx_bytes > before.rx_bytes and after.tx_bytes > before.tx_bytes
    assert after.endpoint.startswith(f"{CL_UNDER}:")

    served.sendall(b"x" * 20000)
    got = b""
    while len(got) < 20000:
        got += conn.recv(65536)
    later = lab.gw("show", lab.gw_if).peer(client.public)
    assert later.tx_bytes > after.tx_bytes + 20000 and later.rx_bytes > after.rx_bytes
    served.close()


def test_udp_over_ipv6_through_the_tunnel(lab, client):
    server, sender = udp_pair(lab, CL_TUN6, GW_TUN6, 7002, socket.AF_INET6)
    assert wait_until(lambda: arrives(server, sender, GW_TUN6, 7002, b"six"), what="IPv6 datagram") \
        == (b"six", CL_TUN6)


def test_peer_admitted_only_its_address_cannot_spoof_another(lab, client):
    server, sender = udp_pair(lab, CL_TUN4, GW_TUN4, 7003)
    assert wait_until(lambda: arrives(server, sender, GW_TUN4, 7003, b"real"), what="datagram") \
        == (b"real", CL_TUN4)
    # A second address on the client's own interface: the client's WireGuard sends it (its
    # AllowedIPs cover the routes), the gateway's decrypts it, sees a source this peer is
    # not admitted for, and drops it.
    lab.ns.run("cl", "ip", "address", "add", f"{SPOOF4}/32", "dev", client.name)
    spoofer = lab.ns.socket("cl", timeout=QUIET)
    spoofer.bind((SPOOF4, 0))
    rx = lab.gw("show", lab.gw_if).peer(client.public).rx_bytes
    assert arrives(server, spoofer, GW_TUN4, 7003, b"spoofed") is None
    assert arrives(server, spoofer, GW_TUN4, 7003, b"spoofed") is None
    # it did reach the gateway's WireGuard (counted as received), which dropped it
    assert lab.gw("show", lab.gw_if).peer(client.public).rx_bytes > rx
    assert arrives(server, sender, GW_TUN4, 7003, b"real again") == (b"real again", CL_TUN4)


def test_remove_peer_cuts_the_tunnel(lab, client):
    server, sender = udp_pair(lab, CL_TUN4, GW_TUN4, 7004)
    assert wait_until(lambda: arrives(server, sender, GW_TUN4, 7004, b"before"), what="datagram")
    lab.gw("remove_peer", lab.gw_if, client.public)
    assert lab.gw("show", lab.gw_if).peer(client.public) is None
    assert arrives(server, sender, GW_TUN4, 7004, b"after") is None
    assert arrives(server, sender, GW_TUN4, 7004, b"after") is None
    lab.gw("remove_peer", lab.gw_if, client.public)      # again: nothing to do, no error


def test_ensure_interface_on_existing_keeps_peers_and_sessions(lab, client):
    server, sender = udp_pair(lab, CL_TUN4, GW_TUN4, 7005)
    assert wait_until(lambda: arrives(server, sender, GW_TUN4, 7005, b"one"), what="datagram")
    before = lab.gw("show", lab.gw_if)
    # a restarted controller: same call again
    kind = lab.gw("ensure_interface", lab.gw_if, lab.gw_private, PORT,
                  [ipaddress.ip_interface(f"{GW_TUN4}/24"), ipaddress.ip_interface(f"{GW_TUN6}/64")])
    assert kind == lab.kind == "userspace"
    after = lab.gw("show", lab.gw_if)
    assert after.public_key == before.public_key == lab.gw_public and after.listen_port == PORT
    peer = after.peer(client.public)
    assert peer is not None and peer.allowed_ips == before.peer(client.public).allowed_ips
    # same session: no new handshake was needed
    assert peer.last_handshake == before.peer(client.public).last_handshake > 0
    assert arrives(server, sender, GW_TUN4, 7005, b"two") == (b"two", CL_TUN4)


# ------------------------------------------------------------- peers and life cycle

def test_set_and_add_peers_replace_allowed_ips(lab):
    name = lab.ns.ifname("wp")
    private, public = wireguard.generate_keypair()
    keys = [wireguard.generate_keypair()[1] for _ in range(3)]
    with lab.ns.inside("gw"):
        assert not wireguard.exists(name)
        assert wireguard.ensure_interface(name, private, PORT + 1, ["198.18.101.1/24"]) == "userspace"
        assert wireguard.exists(name) and wireguard.interface_kind(name) == "userspace"
        state = wireguard.show(name)
        assert (state.public_key, state.listen_port, state.peers) == (public, PORT + 1, [])

        def peers():
            return {p.public_key: sorted(map(str, p.allowed_ips)) for p in wireguard.show(name).peers}

        wireguard.set_peers(name, [wireguard.Peer(keys[0], ("198.18.101.10",)),
                                   wireguard.Peer(keys[1], ("198.18.101.11", "fd5a:7467:1::11"))])
        assert peers() == {keys[0]: ["198.18.101.10/32"],
                           keys[1]: ["198.18.101.11/32", "fd5a:7467:1::11/128"]}
        # a new address replaces the old one: no stale address stays admitted
        wireguard.add_peer(name, keys[0], ["198.18.101.20"])
        assert peers()[keys[0]] == ["198.18.101.20/32"]
        # without replace, others stay; with replace, only the list stays
        wireguard.set_peers(name, [wireguard.Peer(keys[2], ("198.18.101.12",))], replace=False)
        assert set(peers()) == set(keys)
        wireguard.set_peers(name, [wireguard.Peer(keys[1], ("198.18.101.11",))])
        assert peers() == {keys[1]: ["198.18.101.11/32"]}
        # an address moves to the peer that is given it last
        wireguard.add_peer(name, keys[2], ["198.18.101.11"])
        assert peers() == {keys[1]: [], keys[2]: ["198.18.101.11/32"]}

        with pytest.raises(InputError):
            wireguard.add_peer(name, "not a key", ["198.18.101.30"])
        with pytest.raises(InputError):
            wireguard.add_peer(name, keys[0], "198.18.101.30")         # a string, not a list
        with pytest.raises(InputError):
            wireguard.add_peer(name, keys[0], ["198.18.101.30/24"])    # host bits set
        with pytest.raises(InputError):
            wireguard.set_peers(name, [wireguard.Peer(keys[0]), wireguard.Peer(keys[0])])

        wireguard.delete_interface(name)
        assert not wireguard.exists(name)
        assert not os.path.exists(f"/var/run/wireguard/{name}.sock")
        wireguard.delete_interface(name)                              # absent: no error
        with pytest.raises(KernelError, match="no WireGuard interface"):
            wireguard.show(name)


def test_wireguard_go_outlives_the_controller(lab):
    """The interface must survive its creator's death, even a SIGKILL to its process group."""
    name = lab.ns.ifname("wo")
    private, _ = wireguard.generate_keypair()
    code = ("import sys, time; from control import wireguard as w; "
            f"w.ensure_interface({name!r}, {private!r}, {PORT + 2}, ['198.18.102.1/24']); "
            "print('ready', flush=True); time.sleep(60)")
    # its own process group, so that killing the group kills nothing of pytest's
    controller = lab.ns.popen("gw", PYTHON, "-c", code, stdout=subprocess.PIPE, text=True, cwd=REPO,
                              start_new_session=True)
    assert controller.stdout.readline().strip() == "ready"
    os.killpg(controller.pid, signal.SIGKILL)
    controller.wait(5)
    with lab.ns.inside("gw"):
        assert wireguard.interface_kind(name) == "userspace"
        assert wireguard.show(name).listen_port == PORT + 2
        wireguard.delete_interface(name)


def test_names_are_unique_across_namespaces_and_bad_input_is_refused(lab):
    private, _ = wireguard.generate_keypair()
    with lab.ns.inside("cl"):
        # the gateway's interface lives in gw, but its socket is visible from everywhere
        with pytest.raises(KernelError, match="another network namespace"):
            wireguard.ensure_interface(lab.gw_if, private, PORT, [])
        assert not wireguard.exists(lab.gw_if)
        with pytest.raises(KernelError, match="not a WireGuard interface"):
            wireguard.interface_kind(lab.veths[1])
    with lab.ns.inside("gw"):
        assert wireguard.exists(lab.gw_if)
        for bad in (dict(name="a-name-much-too-long"), dict(name="bad/name"), dict(private_key="x"),
                    dict(listen_port=-1), dict(listen_port=70000),   # (0: any port, for a side that dials out) dict(addresses=["300.1.1.1/24"]),
                    dict(addresses="198.18.100.1/24")):
            args = dict(name=lab.ns.ifname("bad"), private_key=private, listen_port=PORT, addresses=[]) | bad
            with pytest.raises(InputError):
                wireguard.ensure_interface(**args)
    for bad in ("198.18.0.1", "fd5a::1:51820", "host:port", ":51820", "198.18.0.1:0", "a b:1"):
        with pytest.raises(InputError, match="bad endpoint"):
            wireguard.client_config(private, [CL_TUN4], lab.gw_public, bad, ROUTES)
