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

# state.py    Peer, PeerState, InterfaceState
# keys.py     key pairs and key checks
# checks.py   interface names, ports, address lists
# links.py    the interface's life cycle (which backend, create, delete)
# userspace.py  wireguard-go and its socket API
# netlink.py  kernel WireGuard over generic netlink
# device.py   key, port, addresses and peers of an interface, on either backend
# client.py   a client's configuration file
from .client import client_config
from .device import add_peer, ensure_interface, remove_peer, set_peers, show
from .keys import check_public_key, generate_keypair, public_key_of
from .links import KERNEL, USERSPACE, delete_interface, exists, interface_kind
from .netlink import parse_netlink as _parse_netlink  # noqa: F401 (tests read a netlink dump through it)
from .state import InterfaceState, Peer, PeerState
from .userspace import SOCKET_DIR, WIREGUARD_GO

__all__ = ["KERNEL", "USERSPACE", "SOCKET_DIR", "WIREGUARD_GO", "InterfaceState", "Peer", "PeerState", "add_peer",
           "check_public_key", "client_config", "delete_interface", "ensure_interface", "exists",
           "generate_keypair", "interface_kind", "public_key_of", "remove_peer", "set_peers", "show"]
