"""The learned addresses of one build (zt_learned, ebpf/maps.h): address -> name bits, bit t
set when the address was learned for a name that the policy's name token t matches
(control/learned.py computes the bits, control/kernel.py decides when). Written whole when a
build is loaded, and address by address as names are learned and expire, in place."""
from __future__ import annotations

import ctypes
import ipaddress
from typing import Iterable, Mapping, Union

from .layout import Layout
from .libbpf import hash_count
from .mirrors import NAME_WORD_BYTES, SRC_KEY

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class LearnedMap:
    def __init__(self, bpf, layout: Layout):
        self.table = bpf["zt_learned"]
        self.layout = layout

    def _key(self, addr: Address):
        key = self.table.Key()
        ctypes.memmove(ctypes.byref(key), SRC_KEY.pack(addr.version, addr.packed.rjust(16, b"\0")), SRC_KEY.size)
        return key

    def load(self, bits: Mapping[Address, int]) -> None:
        """Hold exactly these addresses' bits."""
        self.table.clear()
        self.set(bits.items())

    def set(self, entries: Iterable[tuple[Address, int]]) -> None:
        """Write (address, name bits) entries; bits 0 removes the address. Each entry is one
        bpf_map_update_elem (or delete), which replaces the element whole under RCU: a packet
        sees the old bits or the new."""
        size = self.layout.name_words * NAME_WORD_BYTES
        for addr, bits in entries:
            key = self._key(addr)
            if bits:
                if bits >> (size * 8):
                    raise ValueError(f"{addr}: name bits {bits:#x} wider than this build's {size * 8}")
                leaf = self.table.Leaf()
                ctypes.memmove(ctypes.byref(leaf), bits.to_bytes(size, "little"), size)
                self.table[key] = leaf
            else:
                try:
                    del self.table[key]
                except KeyError:
                    pass

    def get(self, addr: Address) -> int:
        """The name bits the kernel holds for ADDR (0: none)."""
        try:
            leaf = self.table[self._key(addr)]
        except KeyError:
            return 0
        return int.from_bytes(bytes(leaf), "little")

    def count(self) -> int:
        return hash_count(self.table)
