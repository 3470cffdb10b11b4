"""The interface as a WireGuard device: made (or adopted) with its key, port and addresses;
its peers written, read and removed, on either backend."""
from __future__ import annotations

import errno

from ..errors import InputError, KernelError
from .checks import check_name, check_port, interfaces, networks
from .keys import check_public_key, decode_key, key_hex, public_key_of
from .links import USERSPACE, backend, create, interface_kind, iproute, netlink_error
from .netlink import kernel_call, parse_netlink
from .state import InterfaceState, Network, Peer
from .userspace import parse_uapi, uapi, uapi_set


def ensure_interface(name: str, private_key: str, listen_port: int, addresses: list) -> str:
    """Make NAME a WireGuard interface with this key, port and addresses, up; return the
    backend (KERNEL or USERSPACE). An existing interface is reused as it is, with its peers
    and sessions (a restarted controller must not cut the tunnels); only what differs is set.
    Addresses are added, never removed."""
    check_name(name)
    decode_key(private_key, "private key")
    check_port(listen_port, lowest=0)     # 0: any port (for a side that only dials out)
    addrs = interfaces(addresses, "interface addresses")
    kind = interface_kind(name) or create(name)
    set_device(name, kind, private_key, listen_port)
    with iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        for a in addrs:
            try:
                ipr.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
            except netlink_error() as e:
                if e.code != errno.EEXIST:
                    raise KernelError(f"{name}: cannot add address {a}: {e}") from None
        try:
            ipr.link("set", index=idx, state="up")
        except netlink_error() as e:
            raise KernelError(f"{name}: cannot set the link up: {e}") from None
    return kind


def set_device(name: str, kind: str, private_key: str, listen_port: int) -> None:
    """Set key and port where they differ (setting an unchanged port would rebind the socket)."""
    state = show(name)
    new_key = public_key_of(private_key) != state.public_key
    new_port = listen_port != state.listen_port and not (listen_port == 0 and state.listen_port)
    if not (new_key or new_port):
        return
    if kind == USERSPACE:
        lines = []
        if new_key:
            lines.append(f"private_key={key_hex(private_key, 'private key')}")
        if new_port:
            lines.append(f"listen_port={listen_port}")
        uapi_set(name, lines)
    else:
        kernel_call(name, "set", private_key=private_key if new_key else None,
                     listen_port=listen_port if new_port else None)


def set_peers(name: str, peers: list[Peer], replace: bool = True) -> None:
    """Write these peers, each admitting exactly its allowed_ips. With replace, peers not in
    the list are removed; peers that stay keep their sessions (no tunnel is cut)."""
    check_name(name)
    wanted: dict[str, list[Network]] = {}
    extra: dict[str, Peer] = {}
    for p in peers:
        check_public_key(p.public_key)
        if p.public_key in wanted:
            raise InputError(f"peer {p.public_key} is listed twice")
        wanted[p.public_key] = networks(p.allowed_ips, f"allowed IPs of peer {p.public_key}")
        if p.endpoint or p.keepalive:
            extra[p.public_key] = p
    kind = backend(name)
    gone = [p.public_key for p in show(name).peers if p.public_key not in wanted] if replace else []
    if kind == USERSPACE:
        lines = []
        for key in gone:
            lines += [f"public_key={key_hex(key)}", "remove=true"]
        for key, nets in wanted.items():
            lines += [f"public_key={key_hex(key)}", "replace_allowed_ips=true"]
            lines += [f"allowed_ip={n}" for n in nets]
            if key in extra:
                if extra[key].endpoint:
                    lines.append(f"endpoint={extra[key].endpoint}")
                lines.append(f"persistent_keepalive_interval={extra[key].keepalive}")
        if lines:
            uapi_set(name, lines)                 # one transaction
    else:
        for key in gone:
            kernel_call(name, "set", peer={"public_key": key, "remove": True})
        for key, nets in wanted.items():
            peer = {"public_key": key, "replace_allowed_ips": True, "allowed_ips": [str(n) for n in nets]}
            if key in extra:
                if extra[key].endpoint:
                    host, _, port = extra[key].endpoint.rpartition(":")
                    peer.update(endpoint_addr=host.strip("[]"), endpoint_port=int(port))
                peer["persistent_keepalive"] = extra[key].keepalive
            kernel_call(name, "set", peer=peer)


def add_peer(name: str, public_key: str, allowed_ips: list) -> None:
    """Add or update one peer; it then admits exactly allowed_ips (old addresses are dropped;
    none: it may still handshake, but nothing passes either way). Its sessions live on."""
    set_peers(name, [Peer(public_key, tuple(allowed_ips))], replace=False)


def remove_peer(name: str, public_key: str) -> None:
    """Remove the peer (its sessions end at once); nothing if it is not there."""
    check_name(name)
    check_public_key(public_key)
    if backend(name) == USERSPACE:
        uapi_set(name, [f"public_key={key_hex(public_key)}", "remove=true"])
    else:
        kernel_call(name, "set", peer={"public_key": public_key, "remove": True})


def show(name: str) -> InterfaceState:
    """Key, port and peers of the interface, with handshake times and byte counters."""
    check_name(name)
    if backend(name) == USERSPACE:
        return parse_uapi(uapi(name, "get=1\n\n"))
    return parse_netlink(kernel_call(name, "info"))
