"""Conntrack from userspace: the flows the kernel tracks (zt_ct, with what the per-CPU flow
cache counted since), ending them (kill), forgetting them, and the epoch that makes the kernel
decide flows again. Program.conntrack is one; Program's flow methods (flows, kill_flow(s),
clear_flows, forget_flows(_except), epoch, next_epoch) are its, under the same names."""
from __future__ import annotations

import ctypes
import ipaddress
import time
from collections import defaultdict
from typing import Callable, Iterable, Union

from .errors import KernelError
from .libbpf import delete_keys, percpu_array
from .mirrors import CT_KILLED, FSLOT, KILL_BITS

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
# Seconds for a packet that read the kernel's state before a change to be done with it (XDP
# runs in softirq: microseconds); then no packet decided before the change is still writing.
SETTLE = 0.002


def ends(key) -> tuple[bytes, bytes]:
    """A conntrack or fragment key's source and destination, packed (IPv4 in the first 4 of
    the 16 bytes)."""
    n = 4 if key.family == 4 else 16
    return bytes(key.src)[:n], bytes(key.dst)[:n]


class Conntrack:
    """The conntrack, flow cache, fragment and epoch maps of one loaded program (bcc's BPF
    object; NCPU: possible CPUs). With a pin_dir they are the gateway's, shared by its builds."""

    def __init__(self, bpf, ncpu: int, layout):
        self.bpf = bpf
        self._ncpu = ncpu
        # How long a kill holds (ebpf/kills.h): its protocol's conntrack timeout, from the kill,
        # as ct_alive() times an open flow out (any protocol but TCP and UDP: ICMP's).
        self._holds = {6: layout.ct_tcp_seconds, 17: layout.ct_udp_seconds}
        self._icmp_hold = layout.ct_icmp_seconds
        try:    # (a build from an ebpf/ tree older than kills.h has none: scripts/bench --against-source)
            self._kills = bpf["zt_killed"], bpf["zt_kills_until"]
        except KeyError:
            self._kills = None

    def kill_hold(self, proto: int) -> int:
        """Seconds a kill of a flow of this protocol holds after it is made."""
        return self._holds.get(proto, self._icmp_hold)

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
        slots = percpu_array(self.bpf["zt_fcache"], "zt_fcache", FSLOT, self._ncpu).ravel()
        pending = defaultdict(list)    # key -> [(checked_ns, packets, bytes)], as the kernel adds them
        for slot in slots[slots["packets"] != 0]:
            pending[slot["key"].tobytes()].append((int(slot["checked_ns"]), int(slot["packets"]), int(slot["bytes"])))
        out = []
        for k, v in entries:
            src, dst = map(ipaddress.ip_address, ends(k))
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
        their packets drop both ways, as `killed`, for kill_hold(proto) seconds, even if their
        zt_ct entries go meanwhile (evicted, timed out), unless their device opens the tuple
        again with a SYN the policy allows. Returns how many were tracked. Raises KernelError,
        and kills nothing, when the kills do not fit zt_killed (see _hold_kills). Fragmented
        datagrams between a flow's two ends in its protocol, either way, are forgotten too:
        their later fragments carry no ports, so they would not know the flow is killed (a
        datagram of another flow between the same two ends is cut with them)."""
        table = self.bpf["zt_ct"]
        found = []
        for family, proto, src, dst, sport, dport in flows:
            key = table.Key()
            ctypes.memmove(key.src, src.packed, len(src.packed))
            ctypes.memmove(key.dst, dst.packed, len(dst.packed))
            key.sport, key.dport, key.family, key.proto = sport, dport, family, proto
            try:
                found.append((key, table[key], (family, proto, src.packed, dst.packed)))
            except KeyError:
                continue
        if not found:
            return 0
        self._hold_kills([(key, value) for key, value, _ in found])
        between = set()
        for key, value, (family, proto, src, dst) in found:
            value.state = CT_KILLED
            table[key] = value
            between |= {(family, proto, src, dst), (family, proto, dst, src)}
        self._count_kill()
        time.sleep(SETTLE)    # (a first fragment decided before the kill has tracked its datagram)
        frags = self.bpf["zt_frags"]
        # (by the protocol its first fragment was decided on: the key's names IPv6's first
        # header after the Fragment header, which may be an extension header)
        delete_keys(frags, [k for k, v in frags.items_lookup_batch() if (k.family, v.proto, *ends(k)) in between])
        return len(found)

    def _hold_kills(self, found: list) -> None:
        """Write these kills ((zt_ct key, value) each) into zt_killed, which nothing evicts, for
        kill_hold(proto) seconds from now (ebpf/kills.h): a packet that finds no live zt_ct entry
        is dropped by them, either way, instead of opening the flow again. The expired records
        are swept first; if the kills still do not fit (ZT_KILL_ENTRIES that hold at once),
        KernelError, and nothing is written. Then zt_kills_until: packets read zt_killed only
        before the latest hold ends."""
        kills, now = self.bpf["zt_killed"], time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        records = list(kills.items_lookup_batch())
        delete_keys(kills, [k for k, v in records if v.until_ns <= now])
        held = {bytes(k) for k, v in records if v.until_ns > now}
        more = {bytes(key) for key, _ in found} - held
        if len(held) + len(more) > kills.max_entries:
            raise KernelError(f"flows kill: {len(more)} more kills do not fit: {len(held)} of the "
                              f"{kills.max_entries} the kernel holds at once have not expired yet (a "
                              "kill holds for its protocol's conntrack timeout); nothing was killed")
        latest = 0
        for key, value in found:
            until = now + self.kill_hold(key.proto) * 1_000_000_000
            kills[kills.Key.from_buffer_copy(bytes(key))] = kills.Leaf(until_ns=until, device=value.device, ident=value.ident)
            latest = max(latest, until)
        gate = self.bpf["zt_kills_until"]
        gate[0] = gate.Leaf(max(latest, gate[0].value))

    def clear_flows(self) -> None:
        """Forget every flow, kill and fragmented datagram (the epoch moves on, so no slot of
        the flow cache holds a flow either): each flow's next packet is decided by the policy."""
        for name in ("zt_ct", "zt_frags"):
            self.bpf[name].items_delete_batch()     # clear() deletes key by key: seconds when full
        if self._kills:
            kills, gate = self._kills
            kills.items_delete_batch()
            gate[0] = gate.Leaf(0)
        self.next_epoch()

    def forget_flows(self, addresses: Iterable[Address]) -> int:
        """Remove the conntrack entries and kills of flows these tunnel addresses opened (a
        device that is removed or disabled: its address may go to another device, which must
        not inherit a way back, nor a kill). Returns how many entries."""
        gone = {(a.version, a.packed) for a in addresses}
        return self._forget(lambda source: source in gone) if gone else 0

    def forget_flows_except(self, addresses: Iterable[Address]) -> int:
        """Remove the conntrack entries and kills of flows that none of these addresses opened
        (those of the devices enabled now): what a device cut without its flows forgotten left
        behind."""
        kept = {(a.version, a.packed) for a in addresses}
        return self._forget(lambda source: source not in kept)

    def _forget(self, which: Callable[[tuple[int, bytes]], bool]) -> int:
        kills = self.bpf["zt_killed"]
        delete_keys(kills, [k for k, _ in kills.items_lookup_batch() if which((k.family, ends(k)[0]))])
        table = self.bpf["zt_ct"]
        return delete_keys(table, [k for k, _ in table.items_lookup_batch() if which((k.family, ends(k)[0]))])
