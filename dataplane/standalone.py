"""The engine alone on an interface, with no gateway daemon (`ztgate dataplane attach` and
`detach`): a build filled with compiled tables, attached with XDP, and pinned so that a later
attach or detach, in another process, finds it.

What one interface's engine pins, under pin_dir(ifname) on bpffs:
    zt_ct, zt_epoch, ... the maps every build shares (Program's pin_dir): conntrack and the
                         epoch carry on from one attach to the next
    prog, prog_reply, tables/   the build in force (Program.pin)

Attaching again builds and fills a new program beside the one in force and swaps it in with
one netlink call (dataplane/attach.py): a packet meets the old build or the new one, each whole,
never no program or half-filled tables. Then the epoch moves, so flows the old policy allowed
are decided again by the new one at their next packet.

This module only uses Program's public calls (build, load, attach, pin, next_epoch)."""
from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pyroute2 import IPRoute

from .attach import attach, attached, detach
from .conntrack import SETTLE
from .errors import InputError, KernelError
from .libbpf import check, libbpf, map_info, obj_get, on_bpffs, unpin_all
from .pinned import forget_record
from .program import Program

PIN_ROOT = Path(os.environ.get("ZTGATE_DP_PIN_ROOT", "/sys/fs/bpf/ztgate-dp"))
NETNS_DIR = Path("/run/netns")
ENGINE_NAMES = ("xdp_ztgate", "xdp_ztgate_repl")   # the kernel keeps 15 characters of a name
# Link types (ARPHRD_*, linux/if_arp.h) by where their frames start under XDP.
ETHERNET_LINKS = {1: "Ethernet", 772: "loopback"}
IP_FIRST_LINKS = {65534: "none (TUN, WireGuard)", 519: "raw IP", 768: "IPIP tunnel", 769: "IP6 tunnel",
                  776: "SIT tunnel", 778: "GRE tunnel", 823: "IP6GRE tunnel"}


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (linux/bpf.h), as far as the program's name."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


def _prog_name_and_maps(prog_id: int) -> tuple[str, set[int]]:
    """The name of the loaded program PROG_ID and the ids of the maps it uses."""
    lib = libbpf()
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    fd = check(lib.bpf_prog_get_fd_by_id(prog_id), f"program {prog_id}")
    try:
        info = ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
        ids = (ctypes.c_uint32 * info.nr_map_ids)()
        info2 = ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
        size = ctypes.c_uint32(ctypes.sizeof(info2))
        check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info2), ctypes.byref(size)), "program info")
        return info.name.decode(errors="replace"), set(ids)
    finally:
        os.close(fd)


def pin_dir(ifname: str) -> Path:
    """Where the engine on IFNAME (an interface of this thread's network namespace) is pinned:
    PIN_ROOT/IFNAME in the host's namespace, PIN_ROOT/netns:NAME/IFNAME in a named one (ip netns),
    PIN_ROOT/netns:INODE/IFNAME in any other. Pins are not per namespace; interface names are."""
    here = os.stat("/proc/thread-self/ns/net")
    if (here.st_dev, here.st_ino) == _ns_key("/proc/1/ns/net"):
        return PIN_ROOT / ifname
    names = sorted(p.name for p in NETNS_DIR.glob("*") if _ns_key(p) == (here.st_dev, here.st_ino)) \
        if NETNS_DIR.is_dir() else []
    return PIN_ROOT / f"netns:{names[0] if names else here.st_ino}" / ifname


def _ns_key(path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def link_is_ethernet(ifname: str) -> bool:
    """Whether XDP sees IFNAME's frames from an Ethernet header (else from the IP header), by
    its link type. InputError for no such interface or a link type of neither kind."""
    with IPRoute() as ipr:
        found = ipr.get_links(ifname=ifname) if ipr.link_lookup(ifname=ifname) else []
    if not found:
        raise InputError(f"no interface {ifname} in this network namespace (see `ip link`)")
    kind = found[0]["ifi_type"]
    if kind in ETHERNET_LINKS:
        return True
    if kind in IP_FIRST_LINKS:
        return False
    raise InputError(f"{ifname}: link type {kind} (linux/if_arp.h ARPHRD_*): the engine reads frames that "
                     f"start at an Ethernet header or at the IP header, and this is neither")


@dataclass
class Occupant:
    """What XDP program IFNAME carries, as far as an attach or a detach cares."""

    prog_id: Optional[int]     # None: no XDP program
    mode: Optional[str]        # native, generic, ...
    ours: bool                 # the engine `dataplane attach` pinned at pin_dir(ifname)
    name: str = ""


def occupant(ifname: str) -> Occupant:
    found = attached(ifname)
    if found is None:
        return Occupant(None, None, False)
    prog, mode = found
    name, maps = _prog_name_and_maps(prog)
    epoch = pin_dir(ifname) / "zt_epoch"
    ours = False
    if name in ENGINE_NAMES and epoch.exists():
        # Ours when it uses the epoch map pinned for this interface: every build attached here
        # shares it, so this holds even when the last attach failed before its pins were made.
        fd = obj_get(epoch)
        try:
            ours = map_info(fd).id in maps
        finally:
            os.close(fd)
    return Occupant(prog, mode, ours, name)


def check_free(ifname: str, mode: str) -> Occupant:
    """Refuse (InputError, nothing changed) an interface carrying an XDP program that is not
    this engine's (a gateway's ingress or connector interface above all), or an attach in a
    mode other than the one in force (that cannot be one step)."""
    there = occupant(ifname)
    if there.prog_id is None or there.ours:
        if there.ours and mode != "auto" and there.mode != mode:
            raise InputError(f"{ifname} has the engine in {there.mode} XDP mode; a replacement in {mode} mode "
                             f"cannot be one step: detach first, or attach with --mode {there.mode}")
        return there
    if there.name in ENGINE_NAMES:
        raise InputError(f"{ifname} is a ztgate gateway's interface (XDP program {there.prog_id}, "
                         f"{there.name}): the gateway decides there; `dataplane attach` leaves it alone")
    raise InputError(f"{ifname} has another XDP program ({there.prog_id}, {there.name or 'no name'}, "
                     f"{there.mode}): detach it first (ip link set dev {ifname} xdp off)")


@dataclass
class Attached:
    ifname: str
    mode: str
    prog_id: int
    pins: Path
    replaced: Optional[int]      # the program id it replaced, if any
    build_seconds: float


def check_bpffs() -> None:
    """The pins need bpffs at PIN_ROOT (or where it will be made)."""
    base = PIN_ROOT if PIN_ROOT.exists() else PIN_ROOT.parent
    if not base.is_dir() or not on_bpffs(base):
        raise KernelError(f"{base} is not on a bpf filesystem: mount -t bpf bpf /sys/fs/bpf; in a network "
                          f"namespace, run under `nsenter --net=/run/netns/NAME` (`ip netns exec` remounts /sys "
                          f"and hides it)")


def install(tables, ifname: str, mode: str = "auto") -> Attached:
    """Build a program for TABLES (control.compiler's, compiled for this interface's frames),
    fill it, attach it to IFNAME in MODE in place of the engine there (one step), pin it."""
    check_bpffs()
    there = check_free(ifname, mode)
    pins = pin_dir(ifname)
    started = time.perf_counter()
    try:
        program = Program(tables.need.with_headroom(), pin_dir=pins)
    except BaseException:
        _unpin_unless(there.ours, pins)
        raise
    try:
        program.load(tables)
        built = time.perf_counter() - started
        # Pins of a past engine here (its interface gone and back) carry an epoch from an unknown
        # past: moved on before the attach, no flow it tracked is trusted by the new build.
        program.next_epoch()
        used = attach(program, ifname, mode)
    except BaseException:
        program.close()
        _unpin_unless(there.ours, pins)
        raise
    try:
        program.pin(pins)
        # Flows the build before allowed are decided again by this one at their next packet.
        # (The wait covers a packet that entered the old build just before the swap.)
        time.sleep(SETTLE)
        program.next_epoch()
        return Attached(ifname, used, program.id, pins, there.prog_id, built)
    finally:
        program.close()    # the attachment and the pins hold the program and its maps


def _unpin_unless(in_force: bool, pins: Path) -> None:
    """After a failed first attach, the shared maps the build pinned go too (an engine in
    force keeps its pins)."""
    if not in_force:
        _unpin(pins)


def remove(ifname: str) -> Optional[int]:
    """Detach the engine from IFNAME and remove its pins; the id of the program detached (None:
    there was none). An interface that is gone: its pins only."""
    check_bpffs()
    pins = pin_dir(ifname)
    with IPRoute() as ipr:
        exists = bool(ipr.link_lookup(ifname=ifname))
    if not exists:
        if not pins.exists():
            raise InputError(f"no interface {ifname} in this network namespace, and no engine pinned "
                             f"for it at {pins}")
        _unpin(pins)
        return None
    there = occupant(ifname)
    if there.prog_id is not None and not there.ours:
        check_free(ifname, "auto")      # says whose program it is
    if there.prog_id is not None:
        detach(ifname)
    _unpin(pins)
    return there.prog_id


def _unpin(pins: Path) -> None:
    """The engine's pins, the record Program.pin() wrote of them (dataplane/pinned.py), and the
    directories they leave empty."""
    unpin_all(pins)
    forget_record(pins)
    _remove_empty(pins.parent)


def _remove_empty(directory: Path) -> None:
    """The netns:NAME directory once its last interface is gone, then PIN_ROOT."""
    for d in (directory, PIN_ROOT):
        if d.is_dir() and d != PIN_ROOT.parent:
            try:
                d.rmdir()
            except OSError:
                return
