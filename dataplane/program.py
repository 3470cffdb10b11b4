"""The kernel side: build ebpf/ztgate.c with bcc for a Layout, fill its maps from compiled
tables, change them in place, read its counters, pin it, and run packets through it with
BPF_PROG_TEST_RUN. Attaching is dataplane/attach.py; flow events are dataplane/events.py."""
from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import mmap
import os
import re
import secrets
import shutil
import struct
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from .errors import KernelError, TablesDoNotFit
from .layout import POOL_BITS, PORT_END, Layout
from .reasons import Reason, Verdict

EBPF_DIR = Path(os.environ.get("ZTGATE_EBPF_DIR", Path(__file__).resolve().parent.parent / "ebpf"))
ENTRY = "xdp_ztgate"
REPLY_ENTRY = "xdp_ztgate_reply"   # for connector interfaces: replies of tracked flows only
REDECIDE_ENTRY = "xdp_ztgate_redecide"
# The maps of one build: its policy, and counters by its rule ids. Program.pin() pins them.
POLICY_MAPS = ("zt_pool4", "zt_pool6", "zt_src_hash", "zt_idents", "zt_nodes", "zt_classes", "zt_port_tables",
               "zt_services", "zt_sport", "zt_rule_stats")
# The maps every build of one gateway shares, pinned under pin_dir (see ebpf/maps.h).
SHARED_MAPS = ("zt_cpu_state", "zt_events", "zt_ct", "zt_fcache", "zt_epoch", "zt_frags")
MAPS = POLICY_MAPS + SHARED_MAPS
DRY_RUN_MAGIC = 0x5A544452   # ebpf/maps.h ZT_DRY_RUN_MAGIC
CT_OPEN, CT_CLOSING, CT_KILLED = 0, 1, 2   # ebpf/maps.h enum zt_ct_state
KILL_BITS = 16                             # ebpf/maps.h ZT_KILL_BITS: the epoch's low bits count kills
# Seconds for a packet that read the kernel's state before a change to be done with it (XDP
# runs in softirq: microseconds); then no packet decided before the change is still writing.
SETTLE = 0.002
# ebpf/maps.h struct zt_fslot (its key is struct zt_ct_key's 40 bytes)
FSLOT = np.dtype([("key", "V40"), ("epoch", "<u8"), ("checked_ns", "<u8"), ("until_ns", "<u8"), ("build", "<u4"),
                  ("rule", "<u4"), ("device", "<u4"), ("ident", "<u4"), ("packets", "<u8"), ("bytes", "<u8")])
MIN_TEST_RUN_BYTES = 14   # BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header
BPF_FS_MAGIC = 0xCAFE4A11
AT_FDCWD = -100
RENAME_EXCHANGE = 2
ENOENT = 2

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


class _XdpMd(ctypes.Structure):
    """struct xdp_md, as a test run's context: data is where the packet starts after metadata."""

    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


class _BatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf 1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (the kernel fills as much as the caller asks for)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32)]


_libbpf = None


def libbpf() -> ctypes.CDLL:
    """libbpf.so.1 (Debian's libbpf1) with the prototypes this package calls. Its functions
    return a negative errno on failure (libbpf 1.x)."""
    global _libbpf
    if _libbpf is None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
        lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
        lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                             ctypes.POINTER(_BatchOpts)]
        lib.bpf_map_delete_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                             ctypes.POINTER(_BatchOpts)]
        _libbpf = lib
    return _libbpf


def _test_run_fn():
    return libbpf().bpf_prog_test_run_opts


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise KernelError(f"{what}: {os.strerror(-ret)}")
    return ret


@functools.cache
def ztgate_source() -> str:
    """ebpf/ztgate.c with its headers written in, read once: every build in a gateway's life
    compiles the source it started with, not a tree edited while it runs."""
    return _with_includes(EBPF_DIR / "ztgate.c")


def _with_includes(path: Path, within: tuple = ()) -> str:
    """PATH with each local `#include "x.h"` replaced by the file, between #line marks so that
    the compiler's and the verifier's messages still name the file and line."""
    if path in within:
        raise KernelError(f"{path.name} includes itself (through {' -> '.join(p.name for p in within)})")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        included = re.match(r'\s*#include "([^"]+)"', line)
        if included:
            out += [f'#line 1 "{included[1]}"', _with_includes(path.parent / included[1], within + (path,)),
                    f'#line {number + 1} "{path.name}"']
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _delete_keys(table, keys: list) -> int:
    """Delete these keys from a hash map in batches; returns how many were deleted. A key that
    went meanwhile (LRU eviction, the kernel's own delete) is skipped: the kernel stops a batch at
    the first missing key with ENOENT and says how many it deleted before it."""
    array = (table.Key * len(keys))(*keys)
    size, start, deleted = ctypes.sizeof(table.Key), 0, 0
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    while start < len(keys):
        count = ctypes.c_uint32(len(keys) - start)
        ret = libbpf().bpf_map_delete_batch(table.map_fd, ctypes.byref(array, start * size),
                                           ctypes.byref(count), ctypes.byref(opts))
        deleted += count.value
        if ret == 0:
            break
        if ret != -errno.ENOENT:
            _check(ret, "BPF_MAP_DELETE_BATCH")
        start += count.value + 1        # (past the missing key)
    return deleted


def _ends(key) -> tuple[bytes, bytes]:
    """A conntrack or fragment key's source and destination, packed (IPv4 in the first 4 of
    the 16 bytes)."""
    n = 4 if key.family == 4 else 16
    return bytes(key.src)[:n], bytes(key.dst)[:n]


def obj_get(path: Union[str, Path]) -> int:
    """A new fd for the object pinned at `path` (the caller closes it)."""
    return _check(libbpf().bpf_obj_get(os.fsencode(path)), f"cannot open the pin {path}")


def map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def prog_id(fd: int) -> int:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return info.id


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (possible CPUs, not online ones)."""
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def ring_pending(fd: int) -> int:
    """Bytes written to a ring buffer map and not yet consumed: its producer position minus
    its consumer position, each in a page of its own (read-only mappings of the first two)."""
    with mmap.mmap(fd, 2 * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        consumer, = struct.unpack_from("<Q", mm, 0)
        producer, = struct.unpack_from("<Q", mm, mmap.PAGESIZE)
    return producer - consumer


def on_bpffs(path: Union[str, Path]) -> bool:
    """Whether `path` (which must exist) lies on a bpf filesystem."""
    buf = ctypes.create_string_buffer(256)   # struct statfs: f_type is its first field (a long)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == BPF_FS_MAGIC


def _pin_path(path: Union[str, Path]) -> Path:
    """An absolute path for pins. It becomes a C string literal in the program (ZT_PIN_DIR)."""
    path = Path(path).absolute()
    if any(c in str(path) for c in '"\\\n'):
        raise ValueError(f"pin directory {str(path)!r}: quotes, backslashes and newlines are not allowed")
    return path


def _bpffs_dir(path: Union[str, Path]) -> Path:
    path = _pin_path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not on_bpffs(path):
        raise KernelError(f"{path} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")
    return path


def _obj_pin(fd: int, path: Path) -> None:
    _check(libbpf().bpf_obj_pin(fd, os.fsencode(path)), f"cannot pin {path}")


def _rename_exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE; bpffs supports it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def unpin_all(directory: Union[str, Path]) -> None:
    """Remove every pin under `directory` and the directory itself (teardown). Objects live on
    while something else holds them (an interface its attached program, the program its maps)."""
    directory = _pin_path(directory)
    if not directory.exists():
        return
    if not on_bpffs(directory):
        raise KernelError(f"{directory} is not on a bpf filesystem: not removing anything there")
    shutil.rmtree(directory)


@dataclass(frozen=True)
class RunResult:
    retval: int          # XDP action
    ns: int              # the kernel's mean run time per repeat
    verdict: Verdict
    reason: Reason
    rule: int            # 0: no rule
    device: int          # 0: none


COUNTER = np.dtype([("packets", "<u8"), ("bytes", "<u8")])   # struct zt_counter


class Program:
    """One loaded ztgate program and its maps. dataplane.attach attaches it to an interface.

    build: a number the program puts in each flow event (-DZT_BUILD), so that a reader names
    rule and device ids with the tables of the build that decided.
    pin_dir: a directory on bpffs where the maps every build of one gateway shares (per-CPU
    state, ring buffer, conntrack: SHARED_MAPS) are pinned: the first build creates them,
    later builds and restarted controllers reuse them. Without it they are this program's own.
    """

    def __init__(self, layout: Layout, build: int = 0, pin_dir: Union[str, Path, None] = None):
        from bcc import BPF  # Debian's python3-bpfcc; imported here so pure code runs anywhere

        if not 0 <= build < 1 << 32:
            raise ValueError(f"build {build}: must fit 32 bits")
        self.layout = layout
        self.build = build
        self.pin_dir = _bpffs_dir(pin_dir) if pin_dir is not None else None
        cflags = ["-Wno-unused-function", f"-DZT_BUILD={build}"] + layout.defines()
        if self.pin_dir is not None:
            cflags.append(f'-DZT_PIN_DIR="{self.pin_dir}"')
        started = time.perf_counter()
        self.bpf = BPF(text=ztgate_source(), cflags=cflags)
        try:
            if self.pin_dir is not None:
                self._check_shared()
            self.fn = self.bpf.load_func(ENTRY, BPF.XDP)
            self.reply_fn = self.bpf.load_func(REPLY_ENTRY, BPF.XDP)
            # the reply entry's tail call, when a flow must be decided again (ebpf/ztgate.c)
            slow = self.bpf["zt_reply_slow"]
            slow[ctypes.c_int(0)] = ctypes.c_int(self.bpf.load_func(REDECIDE_ENTRY, BPF.XDP).fd)
        except BaseException:
            self.bpf.cleanup()
            raise
        self.build_seconds = time.perf_counter() - started
        self._maps: dict[str, mmap.mmap] = {}
        self._ncpu = possible_cpus()

    def _check_shared(self) -> None:
        """bcc reuses a pinned map without comparing it with the source: refuse one whose shape
        is not the one this build was compiled for (the verifier would not always notice)."""
        for name in SHARED_MAPS:
            table = self.bpf[name]
            info = map_info(table.get_fd())
            # bcc's Leaf of a per-CPU map is the array of every CPU's value; sLeaf is one value.
            leaf = getattr(table, "sLeaf", None) or getattr(table, "Leaf", None)
            sizes = (0, 0) if name == "zt_events" else (ctypes.sizeof(table.Key), ctypes.sizeof(leaf))
            want = (table.ttype, table.max_entries, *sizes)
            got = (info.type, info.max_entries, info.key_size, info.value_size)
            if got != want:
                raise KernelError(f"the map pinned at {self.pin_dir / name} has (type, entries, key, value) "
                                  f"{got}, this build wants {want}: remove the old pins (unpin_all) first")

    @property
    def id(self) -> int:
        """The kernel's id of this program (what dataplane.attach.attached() reports)."""
        return prog_id(self.fn.fd)

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()
        self.bpf.cleanup()

    def __enter__(self) -> "Program":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------
    # maps

    def _array(self, name: str) -> np.ndarray:
        """A writable byte view of an mmapable array map: (max_entries, value stride)."""
        table = self.bpf[name]
        stride = (ctypes.sizeof(table.Leaf) + 7) & ~7
        entries = table.max_entries
        mm = self._maps.get(name)
        if mm is None:
            size = (stride * entries + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
            mm = self._maps[name] = mmap.mmap(table.get_fd(), size, mmap.MAP_SHARED,
                                               mmap.PROT_READ | mmap.PROT_WRITE)
        return np.frombuffer(mm, np.uint8, stride * entries).reshape(entries, stride)

    def _write(self, name: str, rows: np.ndarray) -> None:
        view = self._array(name)
        flat = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
        view[len(rows):] = 0
        view[:len(rows), :flat.shape[1]] = flat

    def memory_bytes(self) -> int:
        """Kernel memory the maps hold (memlock as the kernel reports it)."""
        return sum(_memlock(self.bpf[name].get_fd()) for name in MAPS)

    def load(self, tables) -> None:
        """Make the maps hold `tables` (from control.compiler). The tables must fit the layout."""
        lay = self.layout
        short = lay.shortfalls(tables.need)
        if short:
            raise TablesDoNotFit(short)
        for name, entries in (("zt_pool4", tables.pool4), ("zt_pool6", tables.pool6)):
            view = self._array(name)
            view[:] = 0
            if entries:
                idx = np.fromiter(entries.keys(), np.int64, len(entries))
                val = np.array(list(entries.values()), np.uint32)
                view[idx, :8] = val.view(np.uint8).reshape(-1, 8)
        src_hash = self.bpf["zt_src_hash"]
        src_hash.clear()
        for (family, addr), (ident, device) in tables.src_hash.items():
            key = src_hash.Key()
            ctypes.memmove(ctypes.byref(key), struct.pack("<I", family) + addr, 20)
            src_hash[key] = src_hash.Leaf(ident, device)

        self._write("zt_idents", _pad(tables.idents, lay.who_words, 0))
        self._write("zt_nodes", tables.nodes)
        self._write("zt_classes", tables.classes)
        pt = np.full((len(tables.port_tables), 2, lay.port_slots), PORT_END, np.uint32)
        pt[:, 1, :] = 0
        pt[:, :, :tables.port_tables.shape[2]] = tables.port_tables
        self._write("zt_port_tables", pt)
        self._write("zt_services", _pad(tables.services, lay.max_cands, 0))
        self._write("zt_sport", _pad(tables.sport, lay.sport_words, 0))
        self.bpf["zt_rule_stats"].clear()
        if self.pin_dir is None:
            # Unshared, the state starts with the policy. Pinned, it is the gateway's: counters,
            # the event limiter and conntrack carry on across builds.
            self.bpf["zt_cpu_state"].clear()
            self.clear_flows()

    # -----------------------------------------------------------------------------------------
    # changes in place: a live gateway, no reload

    def _pool_slot(self, addr: Address) -> Optional[tuple[str, int]]:
        """(pool map, slot) of an address inside the layout's pools; None: the hash holds it."""
        name, base = ("zt_pool4", self.layout.pool4_base) if addr.version == 4 else ("zt_pool6", self.layout.pool6_base)
        if int(addr) >> POOL_BITS != base >> POOL_BITS:
            return None
        return name, int(addr) & ((1 << POOL_BITS) - 1)

    def _src_key(self, addr: Address):
        table = self.bpf["zt_src_hash"]
        key = table.Key()
        ctypes.memmove(ctypes.byref(key), struct.pack("<I", addr.version) + addr.packed.rjust(16, b"\0"), 20)
        return table, key

    def set_sources(self, entries: Iterable[tuple[Address, int, int]]) -> None:
        """Write (address, identity class, device id) entries; ident 0 removes the address.

        The kernel sees each entry whole. A pool slot is one aligned 8-byte store into the
        mmapped array ({ident, device} is 8 bytes at an 8-aligned offset, and numpy stores an
        aligned uint64 scalar with one instruction); the program reads the slot with one
        8-byte load. A hash entry is one bpf_map_update_elem or delete_elem, which replaces
        the element under RCU. Entries are written one after another, not as a transaction."""
        for addr, ident, device in entries:
            if not 0 <= ident < self.layout.max_idents:
                raise ValueError(f"{addr}: identity class {ident} is outside 0..{self.layout.max_idents - 1}")
            if not 0 <= device < 1 << 32:
                raise ValueError(f"{addr}: device id {device} does not fit 32 bits")
            slot = self._pool_slot(addr)
            if slot is not None:
                words = self._array(slot[0]).view(np.uint64)
                words[slot[1], 0] = (ident | device << 32) if ident else 0
                continue
            table, key = self._src_key(addr)
            if ident:
                table[key] = table.Leaf(ident, device)
            else:
                try:
                    del table[key]
                except KeyError:
                    pass

    def sources_of(self, addresses: Iterable[Address]) -> list[tuple[Address, int, int]]:
        """What the kernel holds now for these addresses, as set_sources() takes it ((a, 0, 0):
        nothing): the undo of a set_sources()."""
        out = []
        for addr in addresses:
            slot = self._pool_slot(addr)
            if slot is not None:
                value = int(self._array(slot[0]).view(np.uint64)[slot[1], 0])
                out.append((addr, value & 0xFFFFFFFF, value >> 32))
                continue
            table, key = self._src_key(addr)
            try:
                leaf = table[key]
            except KeyError:
                out.append((addr, 0, 0))
            else:
                out.append((addr, leaf.ident, leaf.device))
        return out

    def set_idents(self, first_id: int, rows) -> None:
        """Write identity-class rows (who-bits as uint64 words, (n, words)) at first_id, ...

        Each word is one aligned 8-byte store, so the kernel sees every word whole; a row of
        several words is not written at once, and a packet decided meanwhile may see some words
        old and some new. So a class that sources point at should not be rewritten: write the
        new bits at a free id and move the sources there with set_sources (as the gateway does)."""
        rows = np.asarray(rows, np.uint64)
        if rows.ndim == 1:
            rows = rows[None, :]
        n, width = rows.shape
        if first_id < 1 or first_id + n > self.layout.max_idents:
            raise ValueError(f"identity classes {first_id}..{first_id + n - 1}: outside "
                             f"1..{self.layout.max_idents - 1}")
        if width > self.layout.who_words:
            raise ValueError(f"rows of {width} words: this build holds {self.layout.who_words}")
        words = self._array("zt_idents").view(np.uint64)
        words[first_id:first_id + n, :width] = rows
        words[first_id:first_id + n, width:] = 0

    # -----------------------------------------------------------------------------------------
    # counters

    def rule_counters(self) -> dict[int, tuple[int, int]]:
        """Rule id -> (packets, bytes) over all CPUs, for the rules that decided a packet (id 0:
        the default action). Ids are this build's (the compiled tables' rule_names)."""
        counts = self._percpu_array("zt_rule_stats", COUNTER)
        packets, nbytes = counts["packets"].sum(axis=1), counts["bytes"].sum(axis=1)
        return {int(r): (int(packets[r]), int(nbytes[r])) for r in np.flatnonzero(packets)}

    def _percpu_array(self, name: str, dtype: np.dtype) -> np.ndarray:
        """Every value of a per-CPU array, in one batch syscall: (entries, cpus) of dtype."""
        table = self.bpf[name]
        entries = table.max_entries
        stride = (dtype.itemsize + 7) & ~7
        keys = np.zeros(entries, np.uint32)
        values = np.zeros((entries, self._ncpu, stride), np.uint8)
        count = ctypes.c_uint32(entries)
        out_batch = ctypes.c_uint32()
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        ret = libbpf().bpf_map_lookup_batch(table.get_fd(), None, ctypes.byref(out_batch), keys.ctypes.data,
                                            values.ctypes.data, ctypes.byref(count), ctypes.byref(opts))
        if ret < 0 and ret != -ENOENT:     # ENOENT: the last batch, the whole map was read
            _check(ret, f"batch lookup in {name}")
        out = np.zeros((entries, self._ncpu), dtype)
        got = np.ascontiguousarray(values[:count.value, :, :dtype.itemsize])
        out[keys[:count.value]] = got.view(dtype).reshape(count.value, self._ncpu)
        return out

    def _cpu_state(self):
        return self.bpf["zt_cpu_state"][0]

    def reason_counters(self) -> dict[Reason, tuple[int, int]]:
        """Reason -> (packets, bytes) over all CPUs: every packet decided, by why. With pin_dir
        the counts run on across builds (the state is shared)."""
        cpus = self._cpu_state()
        return {r: (sum(c.reason[r].packets for c in cpus), sum(c.reason[r].bytes for c in cpus)) for r in Reason}

    @property
    def epoch(self) -> int:
        """The epoch conntrack compares with (shared by the builds of one pin dir): the policy's
        generation in the high bits, the kills since in the low KILL_BITS."""
        return self.bpf["zt_epoch"][0].value

    def _set_epoch(self, value: int) -> int:
        # (A read, then a write: callers serialize, as the gateway's lock does. Interleaved, a
        # kill could take back a change's move.)
        table = self.bpf["zt_epoch"]
        table[0] = table.Leaf(value)
        return value

    def next_epoch(self) -> int:
        """Move the epoch on, after a change to the policy or identities the kernel holds: every
        flow is decided again at its next packet, and the connector side at its next reply."""
        return self._set_epoch(((self.epoch >> KILL_BITS) + 1) << KILL_BITS)

    def _count_kill(self) -> int:
        """A flow was killed in zt_ct: every CPU's flow cache checks its flows against zt_ct
        once more (the killed one drops there), and no other decision is made again."""
        return self._set_epoch(self.epoch + 1)

    def flows(self) -> list[dict]:
        """Conntrack's entries: the 5-tuple as the device sent it and what ebpf/maps.h struct
        zt_ct holds (times on the coarse CLOCK_MONOTONIC), with the packets the flow cache
        counted since its last check added."""
        # zt_ct first, then the slots: counts a CPU moves from a slot to its flow in between are
        # missed this once, never counted twice
        entries = list(self.bpf["zt_ct"].items_lookup_batch())
        slots = self._percpu_array("zt_fcache", FSLOT).ravel()
        pending = defaultdict(list)    # key -> [(checked_ns, packets, bytes)], as the kernel adds them
        for slot in slots[slots["packets"] != 0]:
            pending[slot["key"].tobytes()].append((int(slot["checked_ns"]), int(slot["packets"]), int(slot["bytes"])))
        out = []
        for k, v in entries:
            src, dst = map(ipaddress.ip_address, _ends(k))
            flow = {"family": k.family, "proto": k.proto, "src": src, "dst": dst, "sport": k.sport, "dport": k.dport,
                    **{f: getattr(v, f) for f, _ in v._fields_ if f != "pad"}}
            for checked, packets, nbytes in pending.get(bytes(k), ()):
                if v.created_ns <= checked:   # (else the slot's counts are of an earlier flow on the tuple)
                    flow["packets"] += packets
                    flow["bytes"] += nbytes
            out.append(flow)
        return out

    def kill_flow(self, family: int, proto: int, src: Address, dst: Address, sport: int, dport: int) -> bool:
        """End one flow (as flows() names it); False if there is no such flow. See kill_flows."""
        return self.kill_flows([(family, proto, src, dst, sport, dport)]) == 1

    def kill_flows(self, flows: Iterable[tuple]) -> int:
        """End these flows, each (family, proto, src, dst, sport, dport) as flows() names it:
        their packets drop both ways, as `killed`, until they time out or their device opens
        the tuple again with a SYN. Returns how many were tracked. Fragmented datagrams between
        a flow's two ends in its protocol, either way, are forgotten too: their later fragments
        carry no ports, so they would not know the flow is killed (a datagram of another flow
        between the same two ends is cut with them)."""
        table = self.bpf["zt_ct"]
        ends, killed = set(), 0
        for family, proto, src, dst, sport, dport in flows:
            key = table.Key()
            ctypes.memmove(key.src, src.packed, len(src.packed))
            ctypes.memmove(key.dst, dst.packed, len(dst.packed))
            key.sport, key.dport, key.family, key.proto = sport, dport, family, proto
            try:
                value = table[key]
            except KeyError:
                continue
            value.state = CT_KILLED
            table[key] = value
            killed += 1
            ends |= {(family, proto, src.packed, dst.packed), (family, proto, dst.packed, src.packed)}
        if not killed:
            return 0
        self._count_kill()
        time.sleep(SETTLE)    # (a first fragment decided before the kill has tracked its datagram)
        frags = self.bpf["zt_frags"]
        _delete_keys(frags, [k for k, _ in frags.items_lookup_batch() if (k.family, k.proto, *_ends(k)) in ends])
        return killed

    def clear_flows(self) -> None:
        """Forget every flow and fragmented datagram (the epoch moves on, so no slot of the
        flow cache holds one either): each flow's next packet is decided by the policy."""
        for name in ("zt_ct", "zt_frags"):
            self.bpf[name].items_delete_batch()     # clear() deletes key by key: seconds when full
        self.next_epoch()

    def forget_flows(self, addresses: Iterable[Address]) -> int:
        """Remove the conntrack entries of flows these tunnel addresses opened (a device that is
        removed or disabled: its address may go to another device, which must not inherit a
        way back). Returns how many."""
        gone = {(a.version, a.packed) for a in addresses}
        return self._forget(lambda source: source in gone) if gone else 0

    def forget_flows_except(self, addresses: Iterable[Address]) -> int:
        """Remove the conntrack entries of flows that none of these addresses opened (those of
        the devices enabled now): what a device cut without its flows forgotten left behind."""
        kept = {(a.version, a.packed) for a in addresses}
        return self._forget(lambda source: source not in kept)

    def _forget(self, which) -> int:
        table = self.bpf["zt_ct"]
        return _delete_keys(table, [k for k, _ in table.items_lookup_batch()
                                    if which((k.family, _ends(k)[0]))])

    def event_counters(self) -> dict[str, int]:
        """Flow events over all CPUs: sent, and not sent (over the rate; ring buffer full)."""
        cpus = self._cpu_state()
        return {"sent": sum(c.ev_sent for c in cpus), "rate_limited": sum(c.ev_limited for c in cpus),
                "ring_full": sum(c.ev_full for c in cpus)}

    def conntrack_hits(self) -> int:
        """Packets the established path allowed (conntrack, no policy walk), over all CPUs."""
        return sum(c.ct_hits for c in self._cpu_state())

    def events_lost(self) -> int:
        """Events the kernel did not emit (rate limit or ring buffer full), over all CPUs."""
        c = self.event_counters()
        return c["rate_limited"] + c["ring_full"]

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """Map -> (entries in use, capacity) for the maps that fill as the gateway runs: the
        tunnel pools (a scan of the mmapped arrays, ~1 ms each), the source hash and conntrack
        (batch reads: ~10 ms for a full table), and the bytes of events not yet read
        from the ring buffer."""
        out = {}
        for name in ("zt_pool4", "zt_pool6"):
            out[name[3:]] = (int(np.count_nonzero(self._array(name).view(np.uint64))), 1 << POOL_BITS)
        for name, label in (("zt_src_hash", "src_hash"), ("zt_ct", "conntrack")):
            table = self.bpf[name]
            out[label] = (_hash_count(table), table.max_entries)
        fd = self.bpf["zt_events"].get_fd()
        out["event_ring_bytes"] = (ring_pending(fd), map_info(fd).max_entries)
        return out

    # -----------------------------------------------------------------------------------------
    # pins

    def pin(self, directory: Union[str, Path]) -> None:
        """Pin this build under `directory` (on bpffs): the program at prog, its policy maps at
        tables/NAME, so they outlive this process and a restarted controller finds them.

        A build pinned there before is replaced. The new pins are made in a staging
        directory, then tables/ is swapped in with one renameat2(RENAME_EXCHANGE) and prog
        with one rename(2): a reader finds a whole tables/ and a prog at every moment, never
        a missing one. The two swaps are two steps (tables first), so for an instant tables/
        is the new build's and prog the old one's. The old build's pins are then removed."""
        directory = _bpffs_dir(directory)
        # bpffs refuses names with a dot in them
        staging = directory / f"staging-{os.getpid()}-{secrets.token_hex(4)}"
        (staging / "tables").mkdir(parents=True)
        try:
            _obj_pin(self.fn.fd, staging / "prog")
            _obj_pin(self.reply_fn.fd, staging / "prog_reply")
            for name in POLICY_MAPS:
                _obj_pin(self.bpf[name].get_fd(), staging / "tables" / name)
            if (directory / "tables").exists():
                _rename_exchange(staging / "tables", directory / "tables")
            else:
                os.rename(staging / "tables", directory / "tables")
            os.rename(staging / "prog", directory / "prog")
            os.rename(staging / "prog_reply", directory / "prog_reply")
        finally:
            shutil.rmtree(staging)   # the old build's tables after the swap; the new pins on failure

    # -----------------------------------------------------------------------------------------
    # BPF_PROG_TEST_RUN

    @contextmanager
    def on_one_cpu(self) -> Iterator[int]:
        """Run test runs on one CPU, so that its per-CPU 'last decision' is the one to read."""
        saved = os.sched_getaffinity(0)
        cpu = min(saved)
        os.sched_setaffinity(0, {cpu})
        try:
            yield cpu
        finally:
            os.sched_setaffinity(0, saved)

    def run(self, data: bytes, repeat: int = 1, cpu: Optional[int] = None, raw_frame: bool = False,
            reply: bool = False, dry: bool = False) -> RunResult:
        """Run one IP packet (on an Ethernet build, framed first; raw_frame: `data` is the whole
        frame) through the ingress entry, or with reply the connector-side one. dry: decide
        only, as `ztgate trace` does: no counter, event or conntrack entry (the program sees
        DRY_RUN_MAGIC as metadata). Call inside on_one_cpu()."""
        if self.layout.ethernet and not raw_frame:
            data = ethernet_frame(data)
        if len(data) < MIN_TEST_RUN_BYTES:
            # Zero padding keeps the verdict: every IP packet this short is already unreadable.
            data = data + bytes(MIN_TEST_RUN_BYTES - len(data))
        ctx = None
        if dry:
            data = struct.pack("<I", DRY_RUN_MAGIC) + data
            ctx = _XdpMd(data=4, data_end=len(data))   # the first 4 bytes are metadata
        buf = ctypes.create_string_buffer(data, len(data))
        out = ctypes.create_string_buffer(len(data) + 256)
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(buf, ctypes.c_void_p),
                            data_size_in=len(data), data_out=ctypes.cast(out, ctypes.c_void_p),
                            data_size_out=len(out), repeat=max(1, repeat))
        if ctx is not None:
            opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
            opts.ctx_size_in = ctypes.sizeof(ctx)
        fn = self.reply_fn if reply else self.fn
        if _test_run_fn()(fn.fd, ctypes.byref(opts)) != 0:
            raise KernelError(f"BPF_PROG_TEST_RUN failed: {os.strerror(ctypes.get_errno())}")
        last = self._cpu_state()[cpu if cpu is not None else os.sched_getaffinity(0).pop()].last
        return RunResult(opts.retval, opts.duration, Verdict(last.verdict), Reason(last.reason),
                         last.rule, last.device)


def _hash_count(table) -> int:
    """Entries in a hash map: batch reads (a few syscalls) rather than a walk key by key."""
    key_size, value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
    size = table.max_entries
    keys = ctypes.create_string_buffer(size * key_size)
    values = ctypes.create_string_buffer(size * ((value_size + 7) & ~7))
    token_in, token_out = ctypes.c_uint64(), ctypes.c_uint64()     # a bucket index for hash maps
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    total, first = 0, True
    while True:
        count = ctypes.c_uint32(size)
        ret = libbpf().bpf_map_lookup_batch(table.get_fd(), None if first else ctypes.byref(token_in),
                                            ctypes.byref(token_out), keys, values, ctypes.byref(count),
                                            ctypes.byref(opts))
        total += count.value
        if ret == -ENOENT:
            return total
        _check(ret, "batch lookup")
        token_in.value, first = token_out.value, False


def ethernet_frame(ip: bytes) -> bytes:
    """An IP packet as an Ethernet device delivers it (the ethertype from the version nibble)."""
    ethertype = 0x86DD if ip and ip[0] >> 4 == 6 else 0x0800
    return bytes.fromhex("020000000002020000000001") + ethertype.to_bytes(2, "big") + ip


def _pad(rows: np.ndarray, width: int, fill) -> np.ndarray:
    """Widen the second axis of `rows` to `width` (the program's capacity)."""
    if rows.shape[1] == width:
        return rows
    out = np.full((rows.shape[0], width) + rows.shape[2:], fill, rows.dtype)
    out[:, :rows.shape[1]] = rows
    return out


def _memlock(fd: int) -> int:
    try:
        for line in open(f"/proc/self/fdinfo/{fd}"):
            if line.startswith("memlock:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
