"""The kernel side: build ebpf/ztgate.c with bcc for a Layout, load it, fill its maps from
compiled tables, read its counters and pin it. Program is the one class the rest of ztgate
holds; its parts are beside it: the policy maps it fills (dataplane/tables.py), conntrack and
the epoch (dataplane/conntrack.py), test runs (dataplane/testrun.py), and libbpf under them all
(dataplane/libbpf.py). Attaching is dataplane/attach.py; flow events are dataplane/events.py."""
from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from . import testrun
from .conntrack import Address, Conntrack
from .errors import KernelError
from .layout import POOL_BITS, Layout
from .libbpf import (bpffs_dir, hash_count, map_info, memlock, obj_pin, percpu_array, possible_cpus, prog_id,
                     rename_exchange, ring_pending)
from .mirrors import COUNTER
from .reasons import Reason
from .learned import LearnedMap
from .tables import PolicyTables

EBPF_DIR = Path(os.environ.get("ZTGATE_EBPF_DIR", Path(__file__).resolve().parent.parent / "ebpf"))
ENTRY = "xdp_ztgate"
REPLY_ENTRY = "xdp_ztgate_reply"   # for connector interfaces: replies of tracked flows only
REDECIDE_ENTRY = "xdp_ztgate_redecide"
# The reply entry's tail calls, by their slot in zt_reply_slow (ebpf/maps.h ZT_SLOW_*).
TAIL_CALLS = (REDECIDE_ENTRY, "xdp_ztgate_icmp_error")
# The maps of one build: its policy, and counters by its rule ids. Program.pin() pins them.
POLICY_MAPS = ("zt_bank", "zt_pool4", "zt_pool6", "zt_src_hash", "zt_idents", "zt_nodes", "zt_classes", "zt_port_tables",
               "zt_services", "zt_sport", "zt_rule_stats", "zt_learned", "zt_learned_filter")
# The maps every build of one gateway shares, pinned under pin_dir (see ebpf/maps.h).
SHARED_MAPS = ("zt_cpu_state", "zt_events", "zt_ct", "zt_fcache", "zt_epoch", "zt_frags", "zt_killed",
               "zt_kills_until")
MAPS = POLICY_MAPS + SHARED_MAPS
# Pinned beside prog_reply by a gateway's builds (those with a pin_dir): the reply entry's tail
# calls. A program array is emptied when nothing in userspace holds it any more (a pin holds
# it), and a restarted controller may adopt the pinned program (dataplane/pinned.py).
REPLY_SLOW_PIN = "prog_reply_slow"


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


def cflags_for(layout: Layout, pin_dir: Optional[Path]) -> list[str]:
    """The flags ebpf/ztgate.c is compiled with for LAYOUT (and shared maps under PIN_DIR)."""
    cflags = ["-Wno-unused-function"] + layout.defines()
    if pin_dir is not None:
        cflags.append(f'-DZT_PIN_DIR="{pin_dir}"')
    return cflags


_TYPES: dict[str, type] = {}    # bcc's description of a map's key or value type -> its ctypes type


def table_type(desc: str) -> type:
    """The ctypes type bcc describes as DESC, made once and shared by every build: a type made
    per build would stay in ctypes' array type cache for good once bcc makes an array of it
    (per-CPU values, batch buffers): ~60 KiB a build, held for ever."""
    found = _TYPES.get(desc)
    if found is None:
        from bcc import BPF

        found = _TYPES[desc] = BPF._decode_table_type(json.loads(desc))
    return found


def _typed_tables(bpf) -> dict[str, list[str]]:
    """bcc's tables of a compiled module made with the shared types (table_type), before
    anything asks bcc for one: name -> [key description, value description]."""
    from bcc import lib

    descs = {}
    for name in MAPS + ("zt_reply_slow",):
        if lib.bpf_table_fd(bpf.module, name.encode()) < 0:
            continue          # (a build of an older ebpf/ tree: scripts/bench --against-source)
        key, leaf = (f(bpf.module, name.encode()).decode() for f in (lib.bpf_table_key_desc, lib.bpf_table_leaf_desc))
        bpf.tables[name] = bpf.get_table(name, keytype=table_type(key), leaftype=table_type(leaf))
        descs[name] = [key, leaf]
    return descs


class Program:
    """One loaded ztgate program and its maps. dataplane.attach attaches it to an interface.

    build: the number of the build its tables hold (ebpf/maps.h zt_bank: data, not a flag):
    the program puts it in each flow event, so that a reader names rule and device ids with
    the tables of the build that decided. Each policy map has two banks: load() fills the one
    in force, stage() the other, and flip() puts that one in force with a new build number,
    so a policy change needs no new program (ebpf/README.md, "Changes in place").
    pin_dir: a directory on bpffs where the maps every build of one gateway shares (per-CPU
    state, ring buffer, conntrack: SHARED_MAPS) are pinned: the first build creates them,
    later builds and restarted controllers reuse them. Without it they are this program's own.
    """

    def __init__(self, layout: Layout, build: int = 0, pin_dir: Union[str, Path, None] = None):
        from bcc import BPF  # Debian's python3-bpfcc; imported here so pure code runs anywhere

        if not 0 <= build < 1 << 32:
            raise ValueError(f"build {build}: must fit 32 bits")
        self.layout = layout
        self.pin_dir = bpffs_dir(pin_dir) if pin_dir is not None else None
        started = time.perf_counter()
        self.bpf = BPF(text=ztgate_source(), cflags=cflags_for(layout, self.pin_dir))
        try:
            self.descs = _typed_tables(self.bpf)    # (dataplane/pinned.py records them)
            if self.pin_dir is not None:
                self._check_shared()
            self.fn = self.bpf.load_func(ENTRY, BPF.XDP)
            self.reply_fn = self.bpf.load_func(REPLY_ENTRY, BPF.XDP)
            # the reply entry's tail calls (ebpf/ztgate.c); a build from an older tree (the
            # bench's --against-source) may have fewer slots
            slow = self.bpf["zt_reply_slow"]
            for slot, entry in enumerate(TAIL_CALLS[:len(slow)]):
                slow[ctypes.c_int(slot)] = ctypes.c_int(self.bpf.load_func(entry, BPF.XDP).fd)
        except BaseException:
            self.bpf.cleanup()
            raise
        self.build_seconds = time.perf_counter() - started
        self._parts(build)

    def _parts(self, build: int, bank: int = 0) -> None:
        """The views on the maps, BANK in force holding BUILD."""
        self._ncpu = possible_cpus()
        self.policy_tables = PolicyTables(self.bpf, self.layout, build, bank)
        self.learned = LearnedMap(self.bpf, self.layout, self.policy_tables.banks)
        self.conntrack = Conntrack(self.bpf, self._ncpu, self.layout)

    @classmethod
    def on_pins(cls, layout: Layout, pin_dir: Path, maps, fn, reply_fn, descs: dict) -> "Program":
        """A program loaded and pinned before (by a controller gone since), on its pins:
        MAPS stands for bcc's BPF object (dataplane/pinned.py's PinnedMaps), FN and REPLY_FN
        are its entries. The bank in force and its build are read from zt_bank; nothing is
        written. dataplane/pinned.py's adopt() makes one."""
        self = cls.__new__(cls)
        self.layout, self.pin_dir, self.bpf, self.fn, self.reply_fn = layout, pin_dir, maps, fn, reply_fn
        self.descs, self.build_seconds = descs, 0.0
        word = int(np.frombuffer(bytes(maps["zt_bank"][0]), np.uint64)[0])
        self._parts(word >> 32, word & 1)
        return self

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
        self.policy_tables.close()
        self.learned.close()
        self.bpf.cleanup()

    def __enter__(self) -> "Program":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------
    # the policy's tables (PolicyTables)

    @property
    def build(self) -> int:
        """The build the bank in force holds."""
        return self.policy_tables.build

    @property
    def bank(self) -> int:
        """The bank in force (0 or 1)."""
        return self.policy_tables.bank

    def load(self, tables) -> None:
        """Make the maps hold `tables` (from control.compiler). The tables must fit the layout."""
        self.policy_tables.load(tables)
        self.learned.load(tables.learned, self.bank)
        if self.pin_dir is None:
            # Unshared, the state starts with the policy. Pinned, it is the gateway's: counters,
            # the event limiter and conntrack carry on across builds.
            self.bpf["zt_cpu_state"].clear()
            self.clear_flows()

    def stage(self, tables) -> int:
        """Write `tables` into the bank not in force, only the entries that differ from what it
        holds (it decides nothing until flip()): how many entries were written. Raises
        TablesDoNotFit when they need a bigger program."""
        written = self.policy_tables.load(tables, bank=1 - self.bank)
        return written + self.learned.load(tables.learned, 1 - self.bank)

    def flip(self, build: int) -> None:
        """Put the staged bank in force as BUILD: one 8-byte store. The caller moves the epoch
        after it (Conntrack.next_epoch), as after any change."""
        self.policy_tables.flip(build)

    def set_sources(self, entries: Iterable[tuple[Address, int, int]]) -> None:
        """(address, identity class, device id) entries into the kernel: PolicyTables.set_sources."""
        self.policy_tables.set_sources(entries)

    def sources_of(self, addresses: Iterable[Address]) -> list[tuple[Address, int, int]]:
        """The undo of a set_sources(): PolicyTables.sources_of."""
        return self.policy_tables.sources_of(addresses)

    def set_idents(self, first_id: int, rows) -> None:
        """Identity-class rows at first_id, ...: PolicyTables.set_idents."""
        self.policy_tables.set_idents(first_id, rows)

    def set_learned(self, entries: Iterable[tuple[Address, int]], bank: Optional[int] = None) -> None:
        """(address, name bits) entries into BANK (default: the bank in force), in place:
        LearnedMap.set."""
        self.learned.set(entries, self.bank if bank is None else bank)

    # -----------------------------------------------------------------------------------------
    # conntrack and the epoch (Conntrack)

    @property
    def epoch(self) -> int:
        """The epoch conntrack compares with: Conntrack.epoch."""
        return self.conntrack.epoch

    def next_epoch(self) -> int:
        """Every flow decided again at its next packet: Conntrack.next_epoch."""
        return self.conntrack.next_epoch()

    def flows(self) -> list[dict]:
        """The tracked flows: Conntrack.flows."""
        return self.conntrack.flows()

    def kill_flow(self, family: int, proto: int, src: Address, dst: Address, sport: int, dport: int) -> bool:
        """End one flow: Conntrack.kill_flow."""
        return self.conntrack.kill_flow(family, proto, src, dst, sport, dport)

    def kill_hold(self, proto: int) -> int:
        """Seconds a kill holds: Conntrack.kill_hold."""
        return self.conntrack.kill_hold(proto)

    def kill_flows(self, flows: Iterable[tuple]) -> int:
        """End these flows: Conntrack.kill_flows."""
        return self.conntrack.kill_flows(flows)

    def clear_flows(self) -> None:
        """Forget every flow: Conntrack.clear_flows."""
        self.conntrack.clear_flows()

    def forget_flows(self, addresses: Iterable[Address]) -> int:
        """Forget the flows these addresses opened: Conntrack.forget_flows."""
        return self.conntrack.forget_flows(addresses)

    def forget_flows_except(self, addresses: Iterable[Address]) -> int:
        """Forget the flows none of these addresses opened: Conntrack.forget_flows_except."""
        return self.conntrack.forget_flows_except(addresses)

    # -----------------------------------------------------------------------------------------
    # counters

    def memory_bytes(self) -> int:
        """Kernel memory the maps hold (memlock as the kernel reports it)."""
        return sum(memlock(self.bpf[name].get_fd()) for name in MAPS)

    def rule_counters(self, bank: Optional[int] = None) -> dict[int, tuple[int, int]]:
        """Rule id -> (packets, bytes) over all CPUs, for the rules that decided a packet (id 0:
        the default action). Ids are those of the build BANK holds (default: the bank in force)."""
        table = self.bpf["zt_rule_stats"]
        per = table.max_entries // self.policy_tables.banks
        bank = self.bank if bank is None else bank
        counts = percpu_array(table, "zt_rule_stats", COUNTER, self._ncpu, bank * per, per)   # that bank's only
        packets, nbytes = counts["packets"].sum(axis=1), counts["bytes"].sum(axis=1)
        return {int(r): (int(packets[r]), int(nbytes[r])) for r in np.flatnonzero(packets)}

    def cpu_state(self):
        """Every CPU's struct zt_cpu (bcc's ctypes): reason counters, last decision, events."""
        return self.bpf["zt_cpu_state"][0]

    def reason_counters(self) -> dict[Reason, tuple[int, int]]:
        """Reason -> (packets, bytes) over all CPUs: every packet decided, by why. With pin_dir
        the counts run on across builds (the state is shared)."""
        cpus = self.cpu_state()
        return {r: (sum(c.reason[r].packets for c in cpus), sum(c.reason[r].bytes for c in cpus)) for r in Reason}

    def event_counters(self) -> dict[str, int]:
        """Flow events over all CPUs: sent, and not sent (over the rate; ring buffer full)."""
        cpus = self.cpu_state()
        return {"sent": sum(c.ev_sent for c in cpus), "rate_limited": sum(c.ev_limited for c in cpus),
                "ring_full": sum(c.ev_full for c in cpus)}

    def conntrack_hits(self) -> int:
        """Packets the established path allowed (conntrack, no policy walk), over all CPUs."""
        return sum(c.ct_hits for c in self.cpu_state())

    def events_lost(self) -> int:
        """Events the kernel did not emit (rate limit or ring buffer full), over all CPUs."""
        c = self.event_counters()
        return c["rate_limited"] + c["ring_full"]

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """Map -> (entries in use, capacity) for the maps that fill as the gateway runs: the
        tunnel pools and the source hash of the bank in force (a scan of the mmapped arrays, ~1 ms
        each; the hash as userspace wrote it), conntrack (a batch read: ~10 ms for a full table),
        and the bytes of events not yet read from the ring buffer."""
        out = {}
        for name in ("zt_pool4", "zt_pool6"):
            out[name[3:]] = (int(np.count_nonzero(self.policy_tables.in_bank(name).view(np.uint64))), 1 << POOL_BITS)
        # the source hash: the bank in force's entries (userspace is its one writer and keeps
        # what each bank holds), of one bank's capacity
        out["src_hash"] = (self.policy_tables.hashed(), self.bpf["zt_src_hash"].max_entries // self.policy_tables.banks)
        table = self.bpf["zt_ct"]
        out["conntrack"] = (hash_count(table), table.max_entries)
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
        directory = bpffs_dir(directory)
        # bpffs refuses names with a dot in them
        staging = directory / f"staging-{os.getpid()}-{secrets.token_hex(4)}"
        (staging / "tables").mkdir(parents=True)
        try:
            obj_pin(self.fn.fd, staging / "prog")
            obj_pin(self.reply_fn.fd, staging / "prog_reply")
            for name in POLICY_MAPS:
                obj_pin(self.bpf[name].get_fd(), staging / "tables" / name)
            gateway = self.pin_dir == directory    # (its shared maps are pinned there too)
            if gateway:
                obj_pin(self.bpf["zt_reply_slow"].get_fd(), staging / REPLY_SLOW_PIN)
            if (directory / "tables").exists():
                rename_exchange(staging / "tables", directory / "tables")
            else:
                os.rename(staging / "tables", directory / "tables")
            os.rename(staging / "prog", directory / "prog")
            os.rename(staging / "prog_reply", directory / "prog_reply")
            if gateway:
                os.rename(staging / REPLY_SLOW_PIN, directory / REPLY_SLOW_PIN)
        finally:
            shutil.rmtree(staging)   # the old build's tables after the swap; the new pins on failure
        if gateway:
            from .pinned import write_record    # (pinned.py imports this module)

            write_record(self, directory)

    # -----------------------------------------------------------------------------------------
    # BPF_PROG_TEST_RUN (dataplane/testrun.py)

    on_one_cpu = staticmethod(testrun.on_one_cpu)

    def run(self, data: bytes, repeat: int = 1, cpu: Optional[int] = None, raw_frame: bool = False,
            reply: bool = False, dry: bool = False) -> testrun.RunResult:
        """One packet through this program, without an interface: testrun.run. Call inside
        on_one_cpu()."""
        return testrun.run(self, data, repeat, cpu, raw_frame, reply, dry)
