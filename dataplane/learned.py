"""The learned addresses of a program's builds (zt_learned, ebpf/maps.h): address -> name bits, bit t
set when the address was learned for a name that the policy's name token t matches
(control/learned.py computes the bits, control/kernel.py decides when). Written whole when a
build is loaded, and address by address as names are learned and expire, in place; with
zt_learned_filter in front (per slot of a hash of the address, how many are learned)."""
from __future__ import annotations

import ctypes
import ipaddress
import mmap
import struct
from typing import Iterable, Mapping, Union

import numpy as np

from .layout import Layout
from .mirrors import (LEARNED_FILTER_BITS, LEARNED_FILTER_COUNT_BYTES, LEARNED_FILTER_MUL, NAME_WORD_BYTES, SRC_KEY,
                      SRC_KEY_BANK)

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


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
    zt_learned_filter counts the entries of both banks by slot: a slot that counts none holds
    no address of the bank in force either."""

    def __init__(self, bpf, layout: Layout, banks: int = 2):
        self.table = bpf["zt_learned"]
        self.layout = layout
        self.banks = banks
        self.held: list[dict] = [{} for _ in range(banks)]
        fd = bpf["zt_learned_filter"].get_fd()
        self._mm = mmap.mmap(fd, LEARNED_FILTER_COUNT_BYTES << LEARNED_FILTER_BITS, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.counts = np.frombuffer(self._mm, np.uint64)   # (array map values are 8-byte strided)

    def close(self) -> None:
        """Unmap the filter (twice is fine: a Program may be closed more than once)."""
        if self._mm is not None:
            self.counts = None          # the view first: an mmap with a live view cannot close
            self._mm.close()
            self._mm = None

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
        sees the old bits or the new. A new address is in zt_learned before its filter slot
        counts it; a removed one leaves the count after it left (a packet that sees a count
        finds the entry, or finds it gone: learned for nothing)."""
        size = self.layout.name_words * NAME_WORD_BYTES
        held = self.held[bank]
        for addr, bits in entries:
            key = self._key(addr, bank)
            if bits:
                if bits >> (size * 8):
                    raise ValueError(f"{addr}: name bits {bits:#x} wider than this build's {size * 8}")
                leaf = self.table.Leaf()
                ctypes.memmove(ctypes.byref(leaf), bits.to_bytes(size, "little"), size)
                self.table[key] = leaf
                if addr not in held:
                    self.counts[filter_slot(addr)] += 1
                held[addr] = bits
            elif addr in held:
                try:
                    del self.table[key]
                except KeyError:
                    pass
                del held[addr]
                self.counts[filter_slot(addr)] -= 1

    def get(self, addr: Address, bank: int = 0) -> int:
        """The name bits the kernel holds for ADDR in BANK (0: none)."""
        try:
            leaf = self.table[self._key(addr, bank)]
        except KeyError:
            return 0
        return int.from_bytes(bytes(leaf), "little")

    def count(self, bank: int = 0) -> int:
        return len(self.held[bank])
