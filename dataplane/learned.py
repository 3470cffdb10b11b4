"""The learned addresses of a program's builds (zt_learned, ebpf/maps.h): address -> name bits, bit t
set when the address was learned for a name that the policy's name token t matches
(control/learned.py computes the bits, control/kernel.py decides when). Written whole when a
build is loaded, and address by address as names are learned and expire, in place; with
zt_learned_filter in front (per slot of a hash of the address and bank: none, the one address
there with its bits, or "more than one: probe zt_learned")."""
from __future__ import annotations

import ctypes
import ipaddress
import mmap
import struct
import time
from typing import Iterable, Mapping, Union

import numpy as np

from .layout import Layout
from .mirrors import (LEARNED_FILTER_BITS, LEARNED_FILTER_COUNT_BYTES, LEARNED_FILTER_MUL, LEARNED_MANY,
                      LEARNED_ONE_NAMES, NAME_WORD_BYTES, SRC_KEY, SRC_KEY_BANK)

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
SETTLE = 0.002   # (dataplane/tables.py's): a packet that read a slot's copy has finished with it after this


def filter_slot(addr: Address) -> int:
    """zt_learned_filter's slot for ADDR, as ebpf/policy.h's learned_names() computes it: the
    address as zt_pkt holds it (IPv4 in the first four bytes) in four 32-bit words, loaded as
    the host (little-endian) loads them, XORed, times the multiplier, the top bits."""
    words = struct.unpack("<4I", addr.packed.ljust(16, b"\0"))
    mixed = (words[0] ^ words[1] ^ words[2] ^ words[3]) * LEARNED_FILTER_MUL & 0xFFFFFFFF
    return mixed >> (32 - LEARNED_FILTER_BITS)


class LearnedMap:
    """zt_learned, bank by bank like the other policy maps (ebpf/maps.h): the bits are of a
    bank's build, whose name tokens they number, so the bank is in the key (as zt_src_hash's:
    its family from bit SRC_KEY_BANK up). Each bank's entries are also kept here (`held`), so
    that a bank is made to hold a new build's bits by writing only the entries that differ.
    zt_learned_filter says per slot and bank which addresses fall there (`members`): none, one
    (held in the slot itself, in one of two copies) or more (probe zt_learned)."""

    def __init__(self, bpf, layout: Layout, banks: int = 2):
        self.table = bpf["zt_learned"]
        self.layout = layout
        self.banks = banks
        self.held: list[dict] = [{} for _ in range(banks)]
        self.members: list[dict] = [{} for _ in range(banks)]    # slot -> the addresses there
        self._unlinked: dict = {}       # (bank, slot, copy) -> when that copy stopped being read
        flt = bpf["zt_learned_filter"]
        self.stride = (ctypes.sizeof(flt.Leaf) + 7) & ~7
        self.words = max(layout.name_words, 1)
        self.one_bytes = LEARNED_ONE_NAMES + self.words * NAME_WORD_BYTES      # struct zt_learned_one
        size = (self.stride * flt.max_entries + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        self._mm = mmap.mmap(flt.get_fd(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.slots = np.frombuffer(self._mm, np.uint8, self.stride * flt.max_entries).reshape(-1, self.stride)
        self.refs = self.slots[:, :LEARNED_FILTER_COUNT_BYTES].view(np.uint64)[:, 0]   # both refs of a slot

    def close(self) -> None:
        """Unmap the filter (twice is fine: a Program may be closed more than once)."""
        if self._mm is not None:
            self.slots = self.refs = None   # the views first: an mmap with a live view cannot close
            self._mm.close()
            self._mm = None

    @property
    def counts(self) -> np.ndarray:
        """Both refs of each filter slot as one word: 0 where nothing learned falls, in either bank."""
        return self.refs

    def _key(self, addr: Address, bank: int):
        key = self.table.Key()
        family = addr.version | (bank << SRC_KEY_BANK if self.banks > 1 else 0)
        ctypes.memmove(ctypes.byref(key), SRC_KEY.pack(family, addr.packed.rjust(16, b"\0")), SRC_KEY.size)
        return key

    def load(self, bits: Mapping[Address, int], bank: int = 0) -> int:
        """Make BANK hold exactly these addresses' bits: how many entries were written."""
        held = self.held[bank]
        writes = [(a, 0) for a in held if a not in bits] + [(a, b) for a, b in bits.items() if held.get(a) != b]
        self.set(writes, bank)
        return len(writes)

    def set(self, entries: Iterable[tuple[Address, int]], bank: int = 0) -> None:
        """Write (address, name bits) entries into BANK; bits 0 removes the address. Each entry is
        one bpf_map_update_elem (or delete), which replaces the element whole under RCU: a packet
        sees the old bits or the new; then its filter slot says so (_relink). A new address is in
        zt_learned before its slot may send a packet there; a removed one leaves it after its
        slot stopped doing so (a packet sent there finds the entry, or finds it gone: learned
        for nothing)."""
        size = self.layout.name_words * NAME_WORD_BYTES
        held = self.held[bank]
        for addr, bits in entries:
            key = self._key(addr, bank)
            slot = filter_slot(addr)
            there = self.members[bank].setdefault(slot, set())
            if bits:
                if bits >> (size * 8):
                    raise ValueError(f"{addr}: name bits {bits:#x} wider than this build's {size * 8}")
                leaf = self.table.Leaf()
                ctypes.memmove(ctypes.byref(leaf), bits.to_bytes(size, "little"), size)
                self.table[key] = leaf
                held[addr] = bits
                there.add(addr)
                self._relink(bank, slot)
            elif addr in held:
                del held[addr]
                there.discard(addr)
                self._relink(bank, slot)
                try:
                    del self.table[key]
                except KeyError:
                    pass
            if not there:
                del self.members[bank][slot]

    def _relink(self, bank: int, slot: int) -> None:
        """Make the slot's ref for BANK say what falls there now: 0, the one address (written into
        the copy no packet reads, then linked), or LEARNED_MANY. One aligned 8-byte store of
        both refs (the other bank's as it was): a packet reads the old ref or the new."""
        there = self.members[bank].get(slot, ())
        refs = int(self.refs[slot])
        ref = refs >> 32 if bank else refs & 0xFFFFFFFF
        if not there:
            new = 0
        elif len(there) > 1:
            new = LEARNED_MANY
        else:
            addr = next(iter(there))
            one = struct.pack("<I16sI", addr.version, addr.packed.ljust(16, b"\0"), 0) + \
                self.held[bank][addr].to_bytes(self.words * NAME_WORD_BYTES, "little")
            if ref in (1, 2) and bytes(self._copy(bank, slot, ref)) == one:
                return
            new = 2 if ref == 1 else 1
            time.sleep(max(0.0, self._unlinked.get((bank, slot, new), 0.0) + SETTLE - time.perf_counter()))
            self._copy(bank, slot, new)[:] = np.frombuffer(one, np.uint8)
        if new == ref:
            return
        keep = refs & 0xFFFFFFFF if bank else refs >> 32
        self.refs[slot] = np.uint64(keep | new << 32 if bank else new | keep << 32)
        if ref in (1, 2):
            self._unlinked[(bank, slot, ref)] = time.perf_counter()

    def _copy(self, bank: int, slot: int, ref: int) -> np.ndarray:
        """The bytes of copy[2 * bank + ref - 1] of a slot (struct zt_learned_slot)."""
        start = LEARNED_FILTER_COUNT_BYTES + (bank * 2 + ref - 1) * self.one_bytes
        return self.slots[slot, start:start + self.one_bytes]

    def get(self, addr: Address, bank: int = 0) -> int:
        """The name bits the kernel holds for ADDR in BANK (0: none)."""
        try:
            leaf = self.table[self._key(addr, bank)]
        except KeyError:
            return 0
        return int.from_bytes(bytes(leaf), "little")

    def count(self, bank: int = 0) -> int:
        return len(self.held[bank])
