"""Conntrack's flows: listing them (`ztgate flows`) and ending them (`ztgate flows kill`)."""
from __future__ import annotations

import ipaddress
import logging
import time
from typing import Iterator, Optional

from ..errors import InputError
from ..kernel import DEFAULT_RULE
from ..model import fold
from ..protocols import name_of, number_of
from .core import Core

log = logging.getLogger("ztgate.gateway")


class FlowOps(Core):
    def flows(self, user: Optional[str], device: Optional[str], limit: int) -> list[dict]:
        """Live tracked flows, newest first: who, what, which rule, age, traffic both ways."""
        with self.lock:
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            rows = []
            for f, d in self._live_flows(user, device, now):
                rows.append({
                    "proto": name_of(f["proto"]), "src": str(f["src"]), "dst": str(f["dst"]),
                    "sport": f["sport"], "dport": f["dport"],   # an ICMP echo: its id in sport
                    "user": d.user if d else None, "device": d.name if d else None,
                    "rule": (self.kernel.rule_name(f["build"], f["rule"]) if f["rule"] else DEFAULT_RULE),
                    "state": f["state"], "age_s": round(max(0, now - f["created_ns"]) / 1e9, 1),
                    "idle_s": round(max(0, now - f["seen_ns"]) / 1e9, 1),
                    "packets": f["packets"], "bytes": f["bytes"],
                    "reply_packets": f["reply_packets"], "reply_bytes": f["reply_bytes"]})
            rows.sort(key=lambda r: r["age_s"])
            return rows[:limit]

    def _live_flows(self, user: Optional[str], device: Optional[str], now: int) -> Iterator[tuple]:
        """(flow as Kernel.flows() has it, owning device or None) of the flows not yet
        expired, of this user's or device's when given."""
        timeouts = dict(self.config.conntrack)
        owner = {a: d for d in self.identities.devices for a in d.addresses}
        for f in self.kernel.flows():
            proto = name_of(f["proto"])
            timeout = timeouts["tcp_closing" if f["state"] == "closing" else proto if proto in timeouts else "icmp"]
            if now >= f["seen_ns"] + timeout * 10**9:
                continue                  # expired: no longer honoured, not yet evicted
            d = owner.get(f["src"])
            if (user and (d is None or d.user != fold(user))) or (device and (d is None or d.name != device)):
                continue
            yield f, d

    def flows_kill_of(self, uid: int, user: Optional[str], device: Optional[str]) -> dict:
        """End every open flow of a user or a device at once, both ways (incident response: the
        user or device stays enrolled, and its new connections are decided by the policy)."""
        with self.lock:
            if not user and not device:
                raise InputError("flows kill: give a flow (PROTO SRC:PORT DST:PORT), --user EMAIL or --device NAME")
            if user:
                self._user(user)
            if device:
                self._device(device)
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            flows = [(f["src"].version, f["proto"], f["src"], f["dst"], f["sport"], f["dport"])
                     for f, _ in self._live_flows(user, device, now) if f["state"] != "killed"]
            killed = self.kernel.kill_flows(flows)
            detail = {k: v for k, v in (("user", user), ("device", device)) if v}
            self.store.note(uid, "flow kill", {**detail, "flows": killed})
            log.info("%d flows killed by uid %d: %s", killed, uid, detail)
            return {"generation": self.store.generation(), "killed": killed}

    def flows_kill(self, uid: int, proto: str, src: str, sport: int, dst: str, dport: int) -> dict:
        """End one flow: its packets drop both ways for its protocol's conntrack timeout from the
        kill, whatever becomes of its conntrack entry, unless its device opens the tuple again
        with a SYN (a new connection, decided by the policy). A kill that does not fit the
        kernel's table of kills is refused (KernelError), and nothing of it is done."""
        with self.lock:
            try:
                s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
            except ValueError:
                raise InputError(f"flows kill: {src!r} and {dst!r} must be addresses, as `ztgate flows` prints "
                                 "them") from None
            number = number_of(proto, s.version)      # icmp: ICMP or ICMPv6, by the addresses
            if number is None or s.version != d.version:
                raise InputError(f"flows kill: protocol {proto!r} (tcp, udp or icmp) and two addresses of one "
                                 "IP version")
            for port in (sport, dport):
                if not 0 <= port <= 65535:
                    raise InputError(f"flows kill: port {port} is outside 0-65535")
            if not self.kernel.kill_flow(s.version, number, s, d, sport, dport):
                raise InputError(f"no tracked {proto} flow {src}:{sport} -> {dst}:{dport} (see `ztgate flows`)")
            self.store.note(uid, "flow kill", {"proto": proto, "src": f"{src}:{sport}", "dst": f"{dst}:{dport}"})
            log.info("flow killed by uid %d: %s %s:%d -> %s:%d", uid, proto, src, sport, dst, dport)
            return {"generation": self.store.generation(), "killed": True}
