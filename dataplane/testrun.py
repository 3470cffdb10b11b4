"""Packets through a loaded program without an interface: BPF_PROG_TEST_RUN. What the tests,
`ztgate trace` (a dry run: decide only) and the bench use; Program.run and Program.on_one_cpu
are these."""
from __future__ import annotations

import ctypes
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from .errors import KernelError
from .libbpf import TestRunOpts, XdpMd, libbpf
from .mirrors import DRY_RUN_MAGIC
from .reasons import Reason, Verdict

MIN_TEST_RUN_BYTES = 14   # BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header


@dataclass(frozen=True)
class RunResult:
    retval: int          # XDP action
    ns: int              # the kernel's mean run time per repeat
    verdict: Verdict
    reason: Reason
    rule: int            # 0: no rule
    device: int          # 0: none
    name: int = 0        # the name token of a learned name that decided; 0: none


@contextmanager
def on_one_cpu() -> Iterator[int]:
    """Run test runs on one CPU, so that its per-CPU 'last decision' is the one to read."""
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, saved)


def prog_test_run(fd: int, data: bytes, repeat: int = 1, meta: bytes = b"") -> TestRunOpts:
    """Run DATA through the XDP program FD (REPEAT times; META: the metadata before the
    packet); the filled options hold retval and the mean duration."""
    data = meta + data
    ctx = XdpMd(data=len(meta), data_end=len(data)) if meta else None
    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.cast(buf, ctypes.c_void_p),
                       data_size_in=len(data), data_out=ctypes.cast(out, ctypes.c_void_p),
                       data_size_out=len(out), repeat=max(1, repeat))
    if ctx is not None:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    if libbpf().bpf_prog_test_run_opts(fd, ctypes.byref(opts)) != 0:
        raise KernelError(f"BPF_PROG_TEST_RUN failed: {os.strerror(ctypes.get_errno())}")
    return opts


def run(program, data: bytes, repeat: int = 1, cpu: Optional[int] = None, raw_frame: bool = False,
        reply: bool = False, dry: bool = False) -> RunResult:
    """Run one IP packet (on an Ethernet build, framed first; raw_frame: `data` is the whole
    frame) through PROGRAM's ingress entry, or with reply the connector-side one. dry: decide
    only, as `ztgate trace` does: no counter, event or conntrack entry (the program sees
    DRY_RUN_MAGIC as metadata). Call inside on_one_cpu()."""
    if program.layout.ethernet and not raw_frame:
        data = ethernet_frame(data)
    if len(data) < MIN_TEST_RUN_BYTES:
        # Zero padding keeps the verdict: every IP packet this short is already unreadable.
        data = data + bytes(MIN_TEST_RUN_BYTES - len(data))
    meta = struct.pack("<I", DRY_RUN_MAGIC) if dry else b""
    opts = prog_test_run((program.reply_fn if reply else program.fn).fd, data, repeat, meta)
    last = program.cpu_state()[cpu if cpu is not None else os.sched_getaffinity(0).pop()].last
    return RunResult(opts.retval, opts.duration, Verdict(last.verdict), Reason(last.reason),
                     last.rule, last.device, last.name)


def ethernet_frame(ip: bytes) -> bytes:
    """An IP packet as an Ethernet device delivers it (the ethertype from the version nibble)."""
    ethertype = 0x86DD if ip and ip[0] >> 4 == 6 else 0x0800
    return bytes.fromhex("020000000002020000000001") + ethertype.to_bytes(2, "big") + ip
