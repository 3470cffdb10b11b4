"""The gateway's WireGuard side: keys, the interface, its peers, and client configurations.

Everything acts in the network namespace of the calling thread, as the kernel sees it at the
time of the call (every call opens its own netlink socket).

Two backends sit behind one API:
  - kernel WireGuard (a link of kind "wireguard"), driven over generic netlink with pyroute2;
  - wireguard-go (a TUN link of the same name), driven over its userspace API: a unix socket
    /var/run/wireguard/NAME.sock speaking https://www.wireguard.com/xplatform/ (keys in hex).
    That folder is shared by all network namespaces, so interface names must be unique
    across namespaces.
The kernel is tried first; wireguard-go is the fallback where the kernel has no module.

Each device peer is meant to admit only its own addresses (/32 and /128): peers are always
written with "replace allowed IPs", so a peer never keeps an address it was once given.

Library code: raises InputError (bad input) or KernelError (the system refused), never prints.
"""
from __future__ import annotations

import base64
import errno
import ipaddress
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .errors import InputError, KernelError

SOCKET_DIR = "/var/run/wireguard"
WIREGUARD_GO = "wireguard-go"
KERNEL, USERSPACE = "kernel", "userspace"

# What wg-quick accepts as an interface name (and the kernel's IFNAMSIZ - 1 = 15).
_IFNAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}\Z")
_KEY_HELP = "a WireGuard key is 44 characters of base64 encoding exactly 32 bytes (as `wg genkey | wg pubkey` prints)"
_UAPI_TIMEOUT = 5.0      # seconds for one request on the wireguard-go socket
_START_TIMEOUT = 10.0    # seconds for wireguard-go to start and answer

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Interface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]


@dataclass(frozen=True)
class Peer:
    """A peer as configured here: a key and the addresses it may send from (and that are sent
    to it); where to dial it and how often to keep the tunnel up, for peers we dial out to."""
    public_key: str
    allowed_ips: tuple = ()    # addresses or networks; a bare address means /32 or /128
    endpoint: Optional[str] = None   # "IP:port" ("[IPv6]:port"); None: learnt from its packets
    keepalive: int = 0               # seconds between keepalives; 0: off


@dataclass
class PeerState:
    public_key: str
    endpoint: Optional[str]    # "198.18.0.2:51820" or "[fd00::2]:51820"; None before any packet
    allowed_ips: list[Network]
    last_handshake: int        # unix seconds, 0 if never
    rx_bytes: int
    tx_bytes: int


@dataclass
class InterfaceState:
    public_key: str            # "" while the interface has no private key
    listen_port: int
    peers: list[PeerState] = field(default_factory=list)

    def peer(self, public_key: str) -> Optional[PeerState]:
        return next((p for p in self.peers if p.public_key == public_key), None)


# ---------------------------------------------------------------------------------- keys

def generate_keypair() -> tuple[str, str]:
    """A new (private, public) X25519 key pair, both base64 as WireGuard writes them."""
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return _b64(raw), public_key_of(_b64(raw))


def public_key_of(private_b64: str) -> str:
    raw = _decode_key(private_b64, "private key")
    key = X25519PrivateKey.from_private_bytes(raw)
    return _b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def check_public_key(s: str) -> str:
    """The key itself if it is well formed, else InputError saying what a key looks like."""
    _decode_key(s, "public key")
    return s


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _decode_key(s, what: str) -> bytes:
    if not isinstance(s, str):
        raise InputError(f"WireGuard {what} must be a string: {_KEY_HELP}")
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise InputError(f"not a valid WireGuard {what} {s!r}: {_KEY_HELP}") from None
    if len(raw) != 32:
        raise InputError(f"not a valid WireGuard {what} {s!r} ({len(raw)} bytes): {_KEY_HELP}")
    return raw


def _hex(key_b64: str, what: str = "public key") -> str:
    return _decode_key(key_b64, what).hex()


def _from_hex(key_hex: str) -> str:
    return _b64(bytes.fromhex(key_hex))


# ----------------------------------------------------------------------- input checks

def _check_name(name) -> str:
    if not isinstance(name, str) or not _IFNAME.match(name) or name in (".", ".."):
        raise InputError(f"bad WireGuard interface name {name!r}: 1 to 15 of a-z A-Z 0-9 _ = + . -")
    return name


def _check_port(port, lowest: int = 1) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not lowest <= port <= 65535:
        raise InputError(f"bad WireGuard listen port {port!r}: an integer from {lowest} to 65535")
    return port


def _networks(values: Iterable, what: str) -> list[Network]:
    """Addresses or networks -> networks; a bare address becomes /32 or /128."""
    if isinstance(values, (str, bytes)):
        raise InputError(f"{what} must be a list of addresses or networks, not one string")
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(str(v), strict=True))
        except ValueError as e:
            raise InputError(f"bad {what} entry {v!r}: {e}") from None
    return out


def _interfaces(values: Iterable, what: str) -> list[Interface]:
    if isinstance(values, (str, bytes)):
        raise InputError(f"{what} must be a list of addresses with prefix lengths, not one string")
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_interface(str(v)))
        except ValueError as e:
            raise InputError(f"bad {what} entry {v!r}: {e}") from None
    return out


# -------------------------------------------------------------------- interface life cycle

def _iproute():
    from pyroute2 import IPRoute   # imported late: key helpers and client_config need no netlink
    return IPRoute()


def _link_kind(name: str) -> Optional[str]:
    """The link's kind ("wireguard", "tun", "veth", "" for none given) or None if absent here."""
    with _iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        (link,) = ipr.get_links(idx[0])
        return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""


def _socket_path(name: str) -> str:
    return os.path.join(SOCKET_DIR, name + ".sock")


def _answers(name: str) -> bool:
    """Does a wireguard-go serve NAME (from whichever namespace)?"""
    try:
        _uapi(name, "get=1\n\n", timeout=1.0)
        return True
    except KernelError:
        return False


def interface_kind(name: str) -> Optional[str]:
    """KERNEL or USERSPACE for the WireGuard interface NAME in this namespace, None if there
    is no link of that name; KernelError if NAME is a link that is not WireGuard."""
    _check_name(name)
    kind = _link_kind(name)
    if kind is None:
        return None
    if kind == "wireguard":
        return KERNEL
    if kind == "tun" and _answers(name):
        return USERSPACE
    raise KernelError(f"{name} exists but is not a WireGuard interface "
                      f"(a {kind or 'plain'} link{', no wireguard-go answers on ' + _socket_path(name) if kind == 'tun' else ''})")


def exists(name: str) -> bool:
    """Is there a WireGuard interface NAME in this namespace?"""
    return interface_kind(name) is not None


def ensure_interface(name: str, private_key: str, listen_port: int, addresses: list) -> str:
    """Make NAME a WireGuard interface with this key, port and addresses, up; return the
    backend (KERNEL or USERSPACE). An existing interface is reused as it is, with its peers
    and sessions (a restarted controller must not cut the tunnels); only what differs is set.
    Addresses are added, never removed."""
    _check_name(name)
    _decode_key(private_key, "private key")
    _check_port(listen_port, lowest=0)     # 0: any port (for a side that only dials out)
    addrs = _interfaces(addresses, "interface addresses")
    kind = interface_kind(name) or _create(name)
    _set_device(name, kind, private_key, listen_port)
    with _iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        for a in addrs:
            try:
                ipr.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
            except _netlink_error() as e:
                if e.code != errno.EEXIST:
                    raise KernelError(f"{name}: cannot add address {a}: {e}") from None
        try:
            ipr.link("set", index=idx, state="up")
        except _netlink_error() as e:
            raise KernelError(f"{name}: cannot set the link up: {e}") from None
    return kind


def _netlink_error():
    from pyroute2 import NetlinkError
    return NetlinkError


def _create(name: str) -> str:
    try:
        with _iproute() as ipr:
            ipr.link("add", ifname=name, kind="wireguard")
        return KERNEL
    except _netlink_error() as e:
        if e.code == errno.EEXIST:          # created meanwhile by someone else: use theirs
            kind = interface_kind(name)
            if kind is None:
                raise KernelError(f"cannot create WireGuard interface {name}: it appeared and vanished") from None
            return kind
        if e.code != errno.EOPNOTSUPP:      # EOPNOTSUPP: this kernel has no WireGuard module
            raise KernelError(f"cannot create WireGuard interface {name}: {e}") from None
    _start_wireguard_go(name)
    return USERSPACE


def _start_wireguard_go(name: str) -> None:
    if _answers(name):
        # The link is not in this namespace (we looked), but the socket of that name answers:
        # a wireguard-go in another namespace owns the name.
        raise KernelError(f"a wireguard-go already serves {name} from another network namespace; "
                          f"interface names must be unique across namespaces (all share {SOCKET_DIR})")
    _unlink_socket(name)                    # a stale socket left by a killed wireguard-go
    # wireguard-go daemonizes: it creates the TUN link and the listening socket, starts a copy
    # of itself holding both, and exits. That copy must OUTLIVE us: the data plane keeps
    # enforcing while the controller is down or restarting, and a restarted controller adopts
    # the interface with its sessions. Without a session of its own it would stay in our
    # session and process group and die with them (a terminal's SIGHUP, a ^C to the group).
    # (Under systemd the unit must also not kill its whole cgroup: KillMode=process.)
    env = {k: v for k, v in os.environ.items()
           # LOG_LEVEL would make the daemon keep our stdout/stderr (pipes we wait on);
           # the WG_* variables are wireguard-go's own daemonizing protocol.
           if k not in ("LOG_LEVEL", "WG_PROCESS_FOREGROUND", "WG_TUN_FD", "WG_UAPI_FD")}
    try:
        r = subprocess.run([WIREGUARD_GO, name], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, env=env, start_new_session=True, timeout=_START_TIMEOUT)
    except FileNotFoundError:
        raise KernelError(f"cannot create WireGuard interface {name}: the kernel has no WireGuard "
                          f"and {WIREGUARD_GO} is not installed") from None
    except subprocess.TimeoutExpired:
        raise KernelError(f"{WIREGUARD_GO} {name} did not start within {_START_TIMEOUT:.0f} s") from None
    if r.returncode != 0:
        # Drop the banner (a box of line-drawing characters saying a kernel module is better).
        said = " ".join(line.strip() for line in (r.stdout + r.stderr).splitlines()
                        if line.strip() and not any(c in line for c in "│┌└"))
        raise KernelError(f"{WIREGUARD_GO} {name} failed (exit {r.returncode}): {said or 'no message'}")
    deadline = time.monotonic() + _START_TIMEOUT
    while not _answers(name):
        if time.monotonic() > deadline:
            raise KernelError(f"{WIREGUARD_GO} {name} started but {_socket_path(name)} does not answer")
        time.sleep(0.02)


def delete_interface(name: str) -> None:
    """Remove the WireGuard interface NAME from this namespace; nothing if there is none.
    For wireguard-go, deleting its TUN link makes it exit (and remove its socket)."""
    _check_name(name)
    kind = interface_kind(name)
    if kind is not None:
        with _iproute() as ipr:
            try:
                ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
            except _netlink_error() as e:
                if e.code != errno.ENODEV:
                    raise KernelError(f"cannot delete {name}: {e}") from None
    if kind == USERSPACE:
        # wireguard-go notices the deletion a moment later; wait for it to stop answering.
        deadline = time.monotonic() + 3.0
        while _answers(name) and time.monotonic() < deadline:
            time.sleep(0.02)
    if not _answers(name):                  # never remove a socket another namespace uses
        _unlink_socket(name)


def _unlink_socket(name: str) -> None:
    try:
        os.unlink(_socket_path(name))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise KernelError(f"cannot remove stale {_socket_path(name)}: {e.strerror}") from None


def _backend(name: str) -> str:
    kind = interface_kind(name)
    if kind is None:
        raise KernelError(f"no WireGuard interface {name} in this network namespace")
    return kind


# ------------------------------------------------------------------ device and peers

def _set_device(name: str, kind: str, private_key: str, listen_port: int) -> None:
    """Set key and port where they differ (setting an unchanged port would rebind the socket)."""
    state = show(name)
    new_key = public_key_of(private_key) != state.public_key
    new_port = listen_port != state.listen_port and not (listen_port == 0 and state.listen_port)
    if not (new_key or new_port):
        return
    if kind == USERSPACE:
        lines = []
        if new_key:
            lines.append(f"private_key={_hex(private_key, 'private key')}")
        if new_port:
            lines.append(f"listen_port={listen_port}")
        _uapi_set(name, lines)
    else:
        _kernel_call(name, "set", private_key=private_key if new_key else None,
                     listen_port=listen_port if new_port else None)


def set_peers(name: str, peers: list[Peer], replace: bool = True) -> None:
    """Write these peers, each admitting exactly its allowed_ips. With replace, peers not in
    the list are removed; peers that stay keep their sessions (no tunnel is cut)."""
    _check_name(name)
    wanted: dict[str, list[Network]] = {}
    extra: dict[str, Peer] = {}
    for p in peers:
        check_public_key(p.public_key)
        if p.public_key in wanted:
            raise InputError(f"peer {p.public_key} is listed twice")
        wanted[p.public_key] = _networks(p.allowed_ips, f"allowed IPs of peer {p.public_key}")
        if p.endpoint or p.keepalive:
            extra[p.public_key] = p
    kind = _backend(name)
    gone = [p.public_key for p in show(name).peers if p.public_key not in wanted] if replace else []
    if kind == USERSPACE:
        lines = []
        for key in gone:
            lines += [f"public_key={_hex(key)}", "remove=true"]
        for key, nets in wanted.items():
            lines += [f"public_key={_hex(key)}", "replace_allowed_ips=true"]
            lines += [f"allowed_ip={n}" for n in nets]
            if key in extra:
                if extra[key].endpoint:
                    lines.append(f"endpoint={extra[key].endpoint}")
                lines.append(f"persistent_keepalive_interval={extra[key].keepalive}")
        if lines:
            _uapi_set(name, lines)                 # one transaction
    else:
        for key in gone:
            _kernel_call(name, "set", peer={"public_key": key, "remove": True})
        for key, nets in wanted.items():
            peer = {"public_key": key, "replace_allowed_ips": True, "allowed_ips": [str(n) for n in nets]}
            if key in extra:
                if extra[key].endpoint:
                    host, _, port = extra[key].endpoint.rpartition(":")
                    peer.update(endpoint_addr=host.strip("[]"), endpoint_port=int(port))
                peer["persistent_keepalive"] = extra[key].keepalive
            _kernel_call(name, "set", peer=peer)


def add_peer(name: str, public_key: str, allowed_ips: list) -> None:
    """Add or update one peer; it then admits exactly allowed_ips (old addresses are dropped;
    none: it may still handshake, but nothing passes either way). Its sessions live on."""
    set_peers(name, [Peer(public_key, tuple(allowed_ips))], replace=False)


def remove_peer(name: str, public_key: str) -> None:
    """Remove the peer (its sessions end at once); nothing if it is not there."""
    _check_name(name)
    check_public_key(public_key)
    if _backend(name) == USERSPACE:
        _uapi_set(name, [f"public_key={_hex(public_key)}", "remove=true"])
    else:
        _kernel_call(name, "set", peer={"public_key": public_key, "remove": True})


def show(name: str) -> InterfaceState:
    """Key, port and peers of the interface, with handshake times and byte counters."""
    _check_name(name)
    if _backend(name) == USERSPACE:
        return _parse_uapi(_uapi(name, "get=1\n\n"))
    return _parse_netlink(_kernel_call(name, "info"))


# ------------------------------------------------------------ wireguard-go userspace API

def _uapi(name: str, request: str, timeout: float = _UAPI_TIMEOUT) -> str:
    """One request on NAME.sock; returns the reply without its errno line; KernelError on
    errno != 0 or when nothing answers."""
    path = _socket_path(name)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(request.encode("ascii"))
            reply = b""
            while not reply.endswith(b"\n\n"):   # a reply ends with "errno=N\n\n"
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        raise KernelError(f"wireguard-go of {name} does not answer on {path}: {e.strerror or e}") from None
    lines = reply.decode("ascii", "replace").strip("\n").split("\n")
    if not lines or not lines[-1].startswith("errno="):
        raise KernelError(f"wireguard-go of {name}: truncated reply on {path}")
    code = abs(int(lines[-1][len("errno="):] or 0))
    if code:
        raise KernelError(f"wireguard-go of {name} refused the request: {os.strerror(code)} (errno {code})")
    return "\n".join(lines[:-1])


def _uapi_set(name: str, lines: list[str]) -> None:
    _uapi(name, "set=1\n" + "".join(line + "\n" for line in lines) + "\n")


def _parse_uapi(text: str) -> InterfaceState:
    state = InterfaceState(public_key="", listen_port=0)
    peer: Optional[PeerState] = None
    for line in text.split("\n"):
        key, _, value = line.partition("=")
        if key == "private_key":
            state.public_key = public_key_of(_from_hex(value)) if value.strip("0") else ""
        elif key == "listen_port":
            state.listen_port = int(value)
        elif key == "public_key":          # starts the next peer
            peer = PeerState(_from_hex(value), None, [], 0, 0, 0)
            state.peers.append(peer)
        elif peer is None:
            continue
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "allowed_ip":
            peer.allowed_ips.append(ipaddress.ip_network(value))
        elif key == "last_handshake_time_sec":
            peer.last_handshake = int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
    return state


# ---------------------------------------------------------- kernel WireGuard (netlink)
# UNTESTED ON THE DEVELOPMENT HOSTS: their kernel has no WireGuard module, so only the
# wireguard-go path runs there. Keep this part small: pyroute2's WireGuard.set() writes one
# peer per call (REMOVE_ME and REPLACE_ALLOWEDIPS flags) and info() dumps the device.

def _kernel_call(name: str, method: str, **kwargs):
    from pyroute2 import NetlinkError, WireGuard
    try:
        with WireGuard() as wg:
            return getattr(wg, method)(name, **kwargs)
    except NetlinkError as e:
        raise KernelError(f"kernel WireGuard {name}: {method} failed: {e}") from None


def _parse_netlink(messages) -> InterfaceState:
    """A device dump (several messages for many peers; a peer's allowed IPs may continue in
    the next message under the same key) -> InterfaceState."""
    def text(v):
        return v.decode("ascii") if isinstance(v, bytes) else v

    state = InterfaceState(public_key="", listen_port=0)
    by_key: dict[str, PeerState] = {}
    for msg in messages:
        private = text(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))
        if private and base64.b64decode(private) != bytes(32):
            state.public_key = public_key_of(private)
        state.listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or state.listen_port
        for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = text(p.get_attr("WGPEER_A_PUBLIC_KEY"))
            if key not in by_key:
                by_key[key] = PeerState(key, None, [], 0, 0, 0)
                state.peers.append(by_key[key])
            peer = by_key[key]
            ep = p.get_attr("WGPEER_A_ENDPOINT")
            if ep and ep.get("addr"):
                addr = ep["addr"]
                peer.endpoint = f"[{addr}]:{ep['port']}" if ":" in addr else f"{addr}:{ep['port']}"
            hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            if hs:
                peer.last_handshake = int(hs["tv_sec"])
            peer.rx_bytes = p.get_attr("WGPEER_A_RX_BYTES") or peer.rx_bytes
            peer.tx_bytes = p.get_attr("WGPEER_A_TX_BYTES") or peer.tx_bytes
            for a in p.get_attr("WGPEER_A_ALLOWEDIPS") or []:
                if a.get("addr"):
                    peer.allowed_ips.append(ipaddress.ip_network(a["addr"]))
    return state


# ---------------------------------------------------------------- client configuration

def client_config(private_key: str, addresses: list, gateway_public_key: str, endpoint: str,
                  routes: list, keepalive: int = 25) -> str:
    """A client's WireGuard configuration (wg-quick and the WireGuard apps read it):
    its own addresses, the gateway as its one peer at ENDPOINT ("host:port", an IPv6 address
    in brackets), and ROUTES (the networks reached through the gateway) as AllowedIPs."""
    _decode_key(private_key, "private key")
    check_public_key(gateway_public_key)
    addrs = _interfaces(addresses, "client addresses")
    nets = _networks(routes, "routes")
    host, sep, port = endpoint.rpartition(":") if isinstance(endpoint, str) else ("", "", "")
    if (not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535
            or re.search(r"\s", endpoint) or (":" in host and not (host.startswith("[") and host.endswith("]")))):
        raise InputError(f"bad endpoint {endpoint!r}: host:port, with an IPv6 address in brackets "
                         "([2001:db8::1]:51820)")
    if isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
        raise InputError(f"bad keepalive {keepalive!r}: seconds from 0 (off) to 65535")
    lines = ["[Interface]",
             f"PrivateKey = {private_key}",
             f"Address = {', '.join(str(a) for a in addrs)}",
             "",
             "[Peer]",
             f"PublicKey = {gateway_public_key}",
             f"Endpoint = {endpoint}",
             f"AllowedIPs = {', '.join(str(n) for n in nets)}"]
    if keepalive:
        lines.append(f"PersistentKeepalive = {keepalive}")
    return "\n".join(lines) + "\n"
