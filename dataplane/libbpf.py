"""The layer under the Program: libbpf.so.1 through ctypes (its structs and the calls this
package makes), batch operations on maps, pins on a bpf filesystem. Nothing here knows
ztgate's maps; ebpf/'s structs are mirrored in dataplane/mirrors.py."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import KernelError

BPF_FS_MAGIC = 0xCAFE4A11    # linux/magic.h: statfs f_type of a bpf filesystem
AT_FDCWD = -100
RENAME_EXCHANGE = 2


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1)."""

    __test__ = False     # (pytest: not a test class)
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


class XdpMd(ctypes.Structure):
    """struct xdp_md, as a test run's context: data is where the packet starts after metadata."""

    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


class BatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf 1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (the kernel fills as much as the caller asks for)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32)]


# int (*)(void *ctx, void *data, size_t size): libbpf's ring buffer sample callback
RingSampleFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_libbpf = None


def libbpf() -> ctypes.CDLL:
    """libbpf.so.1 (Debian's libbpf1) with the prototypes this package calls. Its functions
    return a negative errno on failure (libbpf 1.x)."""
    global _libbpf
    if _libbpf is None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(TestRunOpts)]
        lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
        lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                             ctypes.POINTER(BatchOpts)]
        lib.bpf_map_delete_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                             ctypes.POINTER(BatchOpts)]
        lib.ring_buffer__new.restype = ctypes.c_void_p
        lib.ring_buffer__new.argtypes = [ctypes.c_int, RingSampleFn, ctypes.c_void_p, ctypes.c_void_p]
        lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
        _libbpf = lib
    return _libbpf


def check(ret: int, what: str) -> int:
    """RET of a libbpf call, or a KernelError naming WHAT when it is a negative errno."""
    if ret < 0:
        raise KernelError(f"{what}: {os.strerror(-ret)}")
    return ret


# ---------------------------------------------------------------------------------------------
# objects by fd

def obj_get(path: Union[str, Path]) -> int:
    """A new fd for the object pinned at `path` (the caller closes it)."""
    return check(libbpf().bpf_obj_get(os.fsencode(path)), f"cannot open the pin {path}")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def prog_id(fd: int) -> int:
    info = ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return info.id


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (possible CPUs, not online ones)."""
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def memlock(fd: int) -> int:
    """Kernel memory a map holds, as /proc reports it (0 when it does not say)."""
    try:
        for line in open(f"/proc/self/fdinfo/{fd}"):
            if line.startswith("memlock:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ring_pending(fd: int) -> int:
    """Bytes written to a ring buffer map and not yet consumed: its producer position minus
    its consumer position, each in a page of its own (read-only mappings of the first two)."""
    with mmap.mmap(fd, 2 * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        consumer, = struct.unpack_from("<Q", mm, 0)
        producer, = struct.unpack_from("<Q", mm, mmap.PAGESIZE)
    return producer - consumer


# ---------------------------------------------------------------------------------------------
# batch operations (a few syscalls for a whole map, where bcc goes key by key)

def delete_keys(table, keys: list) -> int:
    """Delete these keys from a hash map in batches; returns how many were deleted. A key that
    went meanwhile (LRU eviction, the kernel's own delete) is skipped: the kernel stops a batch at
    the first missing key with ENOENT and says how many it deleted before it."""
    array = (table.Key * len(keys))(*keys)
    size, start, deleted = ctypes.sizeof(table.Key), 0, 0
    opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
    while start < len(keys):
        count = ctypes.c_uint32(len(keys) - start)
        ret = libbpf().bpf_map_delete_batch(table.map_fd, ctypes.byref(array, start * size),
                                           ctypes.byref(count), ctypes.byref(opts))
        deleted += count.value
        if ret == 0:
            break
        if ret != -errno.ENOENT:
            check(ret, "BPF_MAP_DELETE_BATCH")
        start += count.value + 1        # (past the missing key)
    return deleted


def hash_count(table) -> int:
    """Entries in a hash map: batch reads (a few syscalls) rather than a walk key by key."""
    key_size, value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
    size = table.max_entries
    keys = ctypes.create_string_buffer(size * key_size)
    values = ctypes.create_string_buffer(size * ((value_size + 7) & ~7))
    token_in, token_out = ctypes.c_uint64(), ctypes.c_uint64()     # a bucket index for hash maps
    opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
    total, first = 0, True
    while True:
        count = ctypes.c_uint32(size)
        ret = libbpf().bpf_map_lookup_batch(table.get_fd(), None if first else ctypes.byref(token_in),
                                            ctypes.byref(token_out), keys, values, ctypes.byref(count),
                                            ctypes.byref(opts))
        total += count.value
        if ret == -errno.ENOENT:
            return total
        check(ret, "batch lookup")
        token_in.value, first = token_out.value, False


def percpu_array(table, name: str, dtype: np.dtype, ncpu: int, first: int = 0,
                 entries: Optional[int] = None) -> np.ndarray:
    """The values of the per-CPU array map NAME, in one batch syscall: (entries, ncpu) of dtype,
    every entry, or ENTRIES of them from FIRST (row 0: entry FIRST; one bank of a banked map)."""
    entries = table.max_entries - first if entries is None else entries
    stride = (dtype.itemsize + 7) & ~7
    keys = np.zeros(entries, np.uint32)
    values = np.zeros((entries, ncpu, stride), np.uint8)
    count = ctypes.c_uint32(entries)
    out_batch = ctypes.c_uint32()
    opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
    after = ctypes.c_uint32(first - 1)      # a batch starts at the key after its in_batch
    ret = libbpf().bpf_map_lookup_batch(table.get_fd(), ctypes.byref(after) if first else None,
                                        ctypes.byref(out_batch), keys.ctypes.data,
                                        values.ctypes.data, ctypes.byref(count), ctypes.byref(opts))
    if ret < 0 and ret != -errno.ENOENT:     # ENOENT: the last batch, the whole map was read
        check(ret, f"batch lookup in {name}")
    out = np.zeros((entries, ncpu), dtype)
    got = np.ascontiguousarray(values[:count.value, :, :dtype.itemsize])
    out[keys[:count.value] - first] = got.view(dtype).reshape(count.value, ncpu)
    return out


# ---------------------------------------------------------------------------------------------
# pins

def on_bpffs(path: Union[str, Path]) -> bool:
    """Whether `path` (which must exist) lies on a bpf filesystem."""
    buf = ctypes.create_string_buffer(256)   # struct statfs: f_type is its first field (a long)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == BPF_FS_MAGIC


def pin_path(path: Union[str, Path]) -> Path:
    """An absolute path for pins. It becomes a C string literal in the program (ZT_PIN_DIR)."""
    path = Path(path).absolute()
    if any(c in str(path) for c in '"\\\n'):
        raise ValueError(f"pin directory {str(path)!r}: quotes, backslashes and newlines are not allowed")
    return path


def bpffs_dir(path: Union[str, Path]) -> Path:
    """PATH as a directory for pins, made if missing; it must lie on a bpf filesystem."""
    path = pin_path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not on_bpffs(path):
        raise KernelError(f"{path} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")
    return path


def obj_pin(fd: int, path: Path) -> None:
    check(libbpf().bpf_obj_pin(fd, os.fsencode(path)), f"cannot pin {path}")


def rename_exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE; bpffs supports it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def unpin_all(directory: Union[str, Path]) -> None:
    """Remove every pin under `directory` and the directory itself (teardown). Objects live on
    while something else holds them (an interface its attached program, the program its maps)."""
    directory = pin_path(directory)
    if not directory.exists():
        return
    if not on_bpffs(directory):
        raise KernelError(f"{directory} is not on a bpf filesystem: not removing anything there")
    shutil.rmtree(directory)
