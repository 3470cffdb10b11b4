"""Attaching a Program to an interface: XDP through netlink (pyroute2), in the network
namespace of the calling thread.

A netlink XDP attachment belongs to the interface, not to the process that made it: it stays
(and keeps the program and its maps alive) after that process exits, until detach() or until
the interface goes. Setting a program on an interface that has one in the same mode replaces
it in one step (the kernel swaps one pointer under RTNL): no packet meets no program."""
from __future__ import annotations

import errno
from typing import Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import KernelError

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
# IFLA_XDP_ATTACHED, which pyroute2 decodes to names
ATTACHED = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi",
            1: "native", 2: "generic", 3: "offload", 4: "multi"}
# What the kernel answers when a driver has no native XDP (TUN devices, for instance).
NO_NATIVE = (errno.EOPNOTSUPP, errno.EINVAL)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise KernelError(f"no interface {ifname} in this network namespace")
    return found[0]


def _set(ipr: IPRoute, index: int, fd: int, flags: int) -> None:
    ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def _query(ipr: IPRoute, index: int) -> Optional[tuple[int, str]]:
    xdp = ipr.get_links(index)[0].get_attr("IFLA_XDP")
    mode = ATTACHED.get(xdp.get_attr("IFLA_XDP_ATTACHED")) if xdp is not None else None
    if mode is None:
        return None
    if mode == "multi":     # native and generic both: name the native one
        return xdp.get_attr("IFLA_XDP_DRV_PROG_ID"), mode
    return xdp.get_attr("IFLA_XDP_PROG_ID"), mode


def attached(ifname: str) -> Optional[tuple[int, str]]:
    """(program id, "native" | "generic" | ...) of the XDP program on `ifname`, or None."""
    with IPRoute() as ipr:
        return _query(ipr, _index(ipr, ifname))


def attach(program, ifname: str, mode: str = "auto", reply: bool = False) -> str:
    """Attach `program` (a dataplane.program.Program) to `ifname`, replacing the program there
    in one step. mode: "native", "generic", or "auto": the mode of the program already there,
    else native where the driver has it, else generic. reply: its connector-side entry (only
    replies of tracked flows pass) instead of the ingress one. Returns the mode used."""
    if mode not in ("auto", "native", "generic"):
        raise ValueError(f"XDP mode {mode!r}: use auto, native or generic")
    fd = (program.reply_fn if reply else program.fn).fd
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        current = _query(ipr, index)
        if current and current[1] not in FLAGS:
            raise KernelError(f"{ifname} has an XDP program in {current[1]} mode: detach it first")
        if mode == "auto" and current:
            mode = current[1]       # a replacement must keep the mode to be one step
        elif current and current[1] != mode:
            # Native and generic cannot be active together: changing mode means a moment
            # with no program, which this function never makes silently.
            raise KernelError(f"{ifname} has an XDP program in {current[1]} mode; replacing it in {mode} "
                              f"mode cannot be done in one step: detach it first")
        tries = ["native", "generic"] if mode == "auto" else [mode]
        for m in tries:
            try:
                _set(ipr, index, fd, FLAGS[m])
                return m
            except NetlinkError as e:
                if m == "native" and mode == "auto" and e.code in NO_NATIVE:
                    continue
                raise KernelError(f"cannot attach XDP ({m}) to {ifname}: {e}") from None
    raise AssertionError("unreachable")


def detach(ifname: str) -> None:
    """Remove the XDP program from `ifname` (nothing if there is none)."""
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        current = _query(ipr, index)
        if current is None:
            return
        modes = ["native", "generic"] if current[1] == "multi" else [current[1]]
        for m in modes:
            if m not in FLAGS:
                raise KernelError(f"{ifname}: cannot detach an XDP program in {m} mode")
            try:
                _set(ipr, index, -1, FLAGS[m])
            except NetlinkError as e:
                raise KernelError(f"cannot detach XDP from {ifname}: {e}") from None
