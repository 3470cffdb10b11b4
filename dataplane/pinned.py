"""A restarted controller takes over the program a gateway pinned, without a compiler run.

bcc loads only from source (clang every time, ~2 s), so a restart would compile again what is
loaded and pinned already. Instead, each time a build is pinned (Program.pin) a record of it is
written beside the pins: the hash of the source and the flags it was compiled from, its layout,
the kernel's ids of its programs and maps, and bcc's descriptions of the maps' key and value
types. adopt() opens the pins again (bpf_obj_get) and makes a Program on them when

- the record is of these very objects (their ids: a crash between pinning and recording, or
  pins made by anything else, does not match),
- the source and the flags this controller would compile the recorded layout with hash to
  the recorded hash (a changed ebpf/ tree or pin dir compiles), and
- the recorded layout holds what the new tables need (a policy that outgrew it compiles).

The policy is then written into the adopted program's bank not in force and flipped, as any
change in place. Records live in RECORD_DIR (a tmpfs, like bpffs gone at reboot), one per pin
dir; `gateway teardown` removes it with the pins."""
from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
from pathlib import Path
from typing import Optional, Union

from .errors import KernelError
from .layout import Layout
from .libbpf import map_info, obj_get, pin_path, prog_id
from .mirrors import SRC_KEY, SRC_KEY_BANK
from .program import ENTRY, POLICY_MAPS, REPLY_ENTRY, REPLY_SLOW_PIN, SHARED_MAPS, Program, cflags_for, table_type, ztgate_source

RECORD_DIR = Path(os.environ.get("ZTGATE_PIN_RECORDS", "/run/ztgate-pins"))
RECORD_VERSION = 1
PROGS = (("prog", ENTRY), ("prog_reply", REPLY_ENTRY))
RECORDED_MAPS = POLICY_MAPS + ("zt_reply_slow",) + SHARED_MAPS


def record_path(pin_dir: Union[str, Path]) -> Path:
    """Where the record of the build pinned under PIN_DIR is kept."""
    return RECORD_DIR / (str(pin_path(pin_dir)).strip("/").replace("/", "+") + ".json")


def source_hash(cflags: list[str]) -> str:
    """What a program is compiled from: ebpf/ztgate.c with its headers, and its flags."""
    return hashlib.sha256("\0".join([ztgate_source()] + cflags).encode()).hexdigest()


def _pins(pin_dir: Path) -> dict[str, Path]:
    """Every pin a record names, by its name in the record."""
    out = {name: pin_dir / name for name, _ in PROGS}
    out.update({name: pin_dir / "tables" / name for name in POLICY_MAPS})
    out.update({name: pin_dir / name for name in SHARED_MAPS}, zt_reply_slow=pin_dir / REPLY_SLOW_PIN)
    return out


def write_record(program: Program, pin_dir: Path) -> None:
    """Record the build just pinned under PIN_DIR (written whole, then renamed into place)."""
    path = record_path(pin_dir)
    try:
        descs = {name: program.descs[name] for name in RECORDED_MAPS}
        ids = {name: prog_id(fn.fd) for name, fn in zip((n for n, _ in PROGS), (program.fn, program.reply_fn))}
        ids.update({name: map_info(program.bpf[name].get_fd()).id for name in RECORDED_MAPS})
    except KeyError:      # a build of an older ebpf/ tree (scripts/bench --against-source): not adopted
        path.unlink(missing_ok=True)
        return
    record = {"version": RECORD_VERSION, "hash": source_hash(cflags_for(program.layout, pin_dir)),
              "layout": dataclasses.asdict(program.layout), "ids": ids, "descs": descs}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def forget_record(pin_dir: Union[str, Path]) -> None:
    record_path(pin_dir).unlink(missing_ok=True)


def adopt(pin_dir: Union[str, Path], need: Layout) -> tuple[Optional[Program], str]:
    """The program pinned under PIN_DIR, if it may be adopted for tables that need NEED:
    (Program, "") or (None, why not)."""
    pin_dir = pin_path(pin_dir)
    try:
        record = json.loads(record_path(pin_dir).read_text())
        if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
            return None, "its record is of another version"
        layout = Layout(**record["layout"])
        recorded_hash, ids, descs = str(record["hash"]), dict(record["ids"]), dict(record["descs"])
    except FileNotFoundError:
        return None, "no record of a pinned build"
    except (OSError, ValueError, TypeError, KeyError) as e:     # not JSON, or not a record of this shape
        return None, f"its record cannot be read ({e!r})"
    short = layout.shortfalls(need) + [f"{f.name} differs" for f in dataclasses.fields(Layout)
                                       if f.name.startswith("ct_") and getattr(layout, f.name) != getattr(need, f.name)]
    if short:
        return None, f"its layout does not hold this policy ({'; '.join(short)})"
    if recorded_hash != source_hash(cflags_for(layout, pin_dir)):
        return None, "the source or the flags differ from those it was compiled from"
    maps = PinnedMaps()
    try:
        fds = {}
        for name, path in _pins(pin_dir).items():
            fds[name] = maps.own(obj_get(path))
            got = prog_id(fds[name]) if name in dict(PROGS) else map_info(fds[name]).id
            if got != ids[name]:
                raise KernelError(f"{path} is not the recorded one")
        for name in RECORDED_MAPS:
            maps.add(name, fds[name], *descs[name])
        fn, reply_fn = (PinnedFunction(entry, fds[name]) for name, entry in PROGS)
        program = Program.on_pins(layout, pin_dir, maps, fn, reply_fn, descs)
    except (KernelError, KeyError, TypeError, ValueError) as e:
        maps.cleanup()
        return None, f"its pins are not the recorded build's ({e})"
    _seed_held(program)
    return program, ""


@dataclasses.dataclass
class PinnedFunction:
    """A program entry on a pin (what bcc's BPF.Function is to a compiled one)."""

    name: str
    fd: int


class PinnedMaps:
    """What Program uses of bcc's BPF object (its tables by name, cleanup), on pinned maps:
    bcc's own table classes, their types from the descriptions bcc gave when it compiled
    them, their type and size from the kernel (bcc reads those from its module, which a pin
    has not)."""

    module = None     # (bcc's table classes ask the module; with none they ask nothing)

    def __init__(self):
        self.tables: dict = {}
        self._fds: list[int] = []

    def own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def add(self, name: str, fd: int, key_desc: str, leaf_desc: str) -> None:
        from bcc import table as bt

        classes = {bt.BPF_MAP_TYPE_HASH: bt.HashTable, bt.BPF_MAP_TYPE_ARRAY: bt.Array,
                   bt.BPF_MAP_TYPE_PROG_ARRAY: bt.ProgArray, bt.BPF_MAP_TYPE_PERCPU_ARRAY: bt.PerCpuArray,
                   bt.BPF_MAP_TYPE_LRU_HASH: bt.LruHash, bt.BPF_MAP_TYPE_RINGBUF: bt.RingBuf}
        info = map_info(fd)
        if info.type not in classes:
            raise KernelError(f"{name}: map type {info.type} is not one ztgate pins")
        key, leaf = table_type(key_desc), table_type(leaf_desc)
        table = classes[info.type](self, info.id, fd, key, leaf, name)
        table.ttype, table.flags, table.max_entries = info.type, info.map_flags, info.max_entries
        self.tables[name] = table

    def __getitem__(self, name: str):
        return self.tables[name]     # KeyError, as bcc's, for a map it has not

    def cleanup(self) -> None:
        self.tables.clear()
        while self._fds:
            os.close(self._fds.pop())


def _seed_held(program: Program) -> None:
    """What each bank of the hashes holds, as the last controller wrote it: a bank is written
    by its differences from what it holds (dataplane/tables.py, dataplane/learned.py)."""
    bank_mask = (1 << SRC_KEY_BANK) - 1
    for key, value in program.bpf["zt_src_hash"].items_lookup_batch():
        family, addr = SRC_KEY.unpack(bytes(key))
        program.policy_tables._hashed[family >> SRC_KEY_BANK][(family & bank_mask, addr)] = (value.ident, value.device)
    learned = program.learned
    for key, value in program.bpf["zt_learned"].items_lookup_batch():
        family, addr = SRC_KEY.unpack(bytes(key))
        bank = family >> SRC_KEY_BANK if learned.banks > 1 else 0
        address = ipaddress.ip_address(addr[12:] if family & bank_mask == 4 else addr)
        learned.held[bank][address] = int.from_bytes(bytes(value), "little")
