"""Kernel WireGuard (a link of kind "wireguard"), driven over generic netlink with pyroute2."""
from __future__ import annotations

import base64
import ipaddress

from ..errors import KernelError
from .keys import public_key_of
from .state import InterfaceState, PeerState


# UNTESTED ON THE DEVELOPMENT HOSTS: their kernel has no WireGuard module, so only the
# wireguard-go path runs there. Keep this part small: pyroute2's WireGuard.set() writes one
# peer per call (REMOVE_ME and REPLACE_ALLOWEDIPS flags) and info() dumps the device.

def kernel_call(name: str, method: str, **kwargs):
    from pyroute2 import NetlinkError, WireGuard
    try:
        with WireGuard() as wg:
            return getattr(wg, method)(name, **kwargs)
    except NetlinkError as e:
        raise KernelError(f"kernel WireGuard {name}: {method} failed: {e}") from None


def parse_netlink(messages) -> InterfaceState:
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
