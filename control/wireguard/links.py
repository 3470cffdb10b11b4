"""The interface's life cycle: which backend serves NAME, creating it (the kernel first,
wireguard-go where the kernel has no module), deleting it."""
from __future__ import annotations

import errno
import os
import socket
import time
from typing import Optional

from ..errors import KernelError
from .checks import check_name
from .userspace import answers, socket_path, start_wireguard_go, unlink_socket


KERNEL, USERSPACE = "kernel", "userspace"


def iproute():
    from pyroute2 import IPRoute   # imported late: key helpers and client_config need no netlink
    return IPRoute()


def netlink_error():
    from pyroute2 import NetlinkError
    return NetlinkError


def link_kind(name: str) -> Optional[str]:
    """The link's kind ("wireguard", "tun", "veth", "" for none given) or None if absent here."""
    with iproute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        (link,) = ipr.get_links(idx[0])
        return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""


def interface_kind(name: str) -> Optional[str]:
    """KERNEL or USERSPACE for the WireGuard interface NAME in this namespace, None if there
    is no link of that name; KernelError if NAME is a link that is not WireGuard."""
    check_name(name)
    kind = link_kind(name)
    if kind is None:
        return None
    if kind == "wireguard":
        return KERNEL
    if kind == "tun" and answers(name):
        return USERSPACE
    raise KernelError(f"{name} exists but is not a WireGuard interface "
                      f"(a {kind or 'plain'} link{', no wireguard-go answers on ' + socket_path(name) if kind == 'tun' else ''})")


def exists(name: str) -> bool:
    """Is there a WireGuard interface NAME in this namespace?"""
    return interface_kind(name) is not None


def create(name: str) -> str:
    try:
        with iproute() as ipr:
            ipr.link("add", ifname=name, kind="wireguard")
        return KERNEL
    except netlink_error() as e:
        if e.code == errno.EEXIST:          # created meanwhile by someone else: use theirs
            kind = interface_kind(name)
            if kind is None:
                raise KernelError(f"cannot create WireGuard interface {name}: it appeared and vanished") from None
            return kind
        if e.code != errno.EOPNOTSUPP:      # EOPNOTSUPP: this kernel has no WireGuard module
            raise KernelError(f"cannot create WireGuard interface {name}: {e}") from None
    start_wireguard_go(name)
    return USERSPACE


def delete_interface(name: str) -> None:
    """Remove the WireGuard interface NAME from this namespace; nothing if there is none.
    For wireguard-go, deleting its TUN link makes it exit (and remove its socket)."""
    check_name(name)
    kind = interface_kind(name)
    if kind is not None:
        with iproute() as ipr:
            try:
                ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
            except netlink_error() as e:
                if e.code != errno.ENODEV:
                    raise KernelError(f"cannot delete {name}: {e}") from None
    if kind == USERSPACE:
        # wireguard-go notices the deletion a moment later; wait for it to stop answering.
        deadline = time.monotonic() + 3.0
        while answers(name) and time.monotonic() < deadline:
            time.sleep(0.02)
    if not answers(name):                  # never remove a socket another namespace uses
        unlink_socket(name)


# Which backend serves a link, by (network namespace, name) -> (ifindex, backend): every
# peer change asks, and asking netlink and wireguard-go costs milliseconds (~7 ms in a
# gateway holding 100k devices), while if_nametoindex costs microseconds. A link of that name
# with the same index in the same namespace is the same link (the kernel hands indexes out
# cyclically: one comes again only after 2^31 links), served as it was when it was made.
_BACKENDS: dict[tuple[int, str], tuple[int, str]] = {}


def _link_index(name: str) -> tuple[int, Optional[int]]:
    """(this thread's network namespace, NAME's index there or None)."""
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    try:
        return netns, socket.if_nametoindex(name)
    except OSError:
        return netns, None


def backend(name: str) -> str:
    check_name(name)
    netns, index = _link_index(name)
    known = _BACKENDS.get((netns, name))
    if index is not None and known is not None and known[0] == index:
        return known[1]
    kind = interface_kind(name)
    if kind is None:
        raise KernelError(f"no WireGuard interface {name} in this network namespace")
    if index is not None:
        _BACKENDS[(netns, name)] = (index, kind)
    return kind
