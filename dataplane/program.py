"""The kernel side: build ebpf/ztgate.c with bcc for a Layout, fill its maps from compiled
tables, and run packets through it with BPF_PROG_TEST_RUN."""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .errors import KernelError, TablesDoNotFit
from .layout import PORT_END, Layout
from .reasons import Reason, Verdict

EBPF_DIR = Path(os.environ.get("ZTGATE_EBPF_DIR", Path(__file__).resolve().parent.parent / "ebpf"))
ENTRY = "xdp_ztgate"
MAPS = ("zt_pool4", "zt_pool6", "zt_src_hash", "zt_idents", "zt_nodes", "zt_classes", "zt_port_tables",
        "zt_services", "zt_sport", "zt_rule_stats", "zt_cpu_state")
MIN_TEST_RUN_BYTES = 14   # BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


_libbpf = None


def _test_run_fn():
    global _libbpf
    if _libbpf is None:
        _libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
        _libbpf.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
    return _libbpf.bpf_prog_test_run_opts


@dataclass(frozen=True)
class RunResult:
    retval: int          # XDP action
    ns: int              # the kernel's mean run time per repeat
    verdict: Verdict
    reason: Reason
    rule: int            # 0: no rule
    device: int          # 0: none


class Program:
    """One loaded ztgate program and its maps (not attached to any interface)."""

    def __init__(self, layout: Layout):
        from bcc import BPF  # Debian's python3-bpfcc; imported here so pure code runs anywhere

        self.layout = layout
        started = time.perf_counter()
        self.bpf = BPF(src_file=str(EBPF_DIR / "ztgate.c"),
                       cflags=[f"-I{EBPF_DIR}", "-Wno-unused-function"] + layout.defines())
        self.fn = self.bpf.load_func(ENTRY, BPF.XDP)
        self.build_seconds = time.perf_counter() - started
        self._maps: dict[str, mmap.mmap] = {}

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
        self.bpf["zt_cpu_state"].clear()

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

    def run(self, data: bytes, repeat: int = 1, cpu: Optional[int] = None, raw_frame: bool = False) -> RunResult:
        """Run one IP packet (on an Ethernet build, framed first; raw_frame: `data` is the whole
        frame). Call inside on_one_cpu()."""
        if self.layout.ethernet and not raw_frame:
            data = ethernet_frame(data)
        if len(data) < MIN_TEST_RUN_BYTES:
            # Zero padding keeps the verdict: every IP packet this short is already unreadable.
            data = data + bytes(MIN_TEST_RUN_BYTES - len(data))
        buf = ctypes.create_string_buffer(data, len(data))
        out = ctypes.create_string_buffer(len(data) + 256)
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(buf, ctypes.c_void_p),
                            data_size_in=len(data), data_out=ctypes.cast(out, ctypes.c_void_p),
                            data_size_out=len(out), repeat=max(1, repeat))
        if _test_run_fn()(self.fn.fd, ctypes.byref(opts)) != 0:
            raise KernelError(f"BPF_PROG_TEST_RUN failed: {os.strerror(ctypes.get_errno())}")
        last = self.bpf["zt_cpu_state"][0][cpu if cpu is not None else os.sched_getaffinity(0).pop()].last
        return RunResult(opts.retval, opts.duration, Verdict(last.verdict), Reason(last.reason),
                         last.rule, last.device)


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
