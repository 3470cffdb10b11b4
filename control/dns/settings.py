"""The `dns:` block of the gateway config: where the private resolvers are, how long what
their answers teach lasts, the queue the answers wait on, and how much may be learned.

    dns:
      resolvers: [10.20.0.53]      # private resolvers, reached through connectors like any private
                                   # address; their answers to devices are learned. []: no slow path
      min_ttl: 60                  # seconds an address is learned for at least ...
      max_ttl: 86400               # ... and at most, whatever the record's TTL
      queue: 5300                  # the NFQUEUE number (one per gateway on a host)
      queue_length: 1024           # packets waiting at most; more pass unlearned (fail-open)
      max_per_name: 64             # addresses learned per name
      max_total: 16384             # (name, address) pairs learned in all (control/learned.py's bounds)
      max_per_device: 1024         # pairs one device's answers brought in, learned at once
                                   # (a max_total below it bounds a device as well)
      questions_per_device: 256    # questions one device may have awaiting their answer
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DnsConfig:
    resolvers: tuple = ()
    min_ttl: int = 60
    max_ttl: int = 86400
    queue: int = 5300
    queue_length: int = 1024
    max_per_name: int = 64
    max_total: int = 16384
    max_per_device: int = 1024
    questions_per_device: int = 256

    @property
    def enabled(self) -> bool:
        return bool(self.resolvers)

    def clamp(self, ttl: int) -> int:
        return max(self.min_ttl, min(self.max_ttl, ttl))


BOUNDS = {"min_ttl": (1, 7 * 86400), "max_ttl": (1, 7 * 86400), "queue": (0, 65535),
          "queue_length": (16, 1 << 20), "max_per_name": (1, 4096), "max_total": (1, 1 << 22),
          "max_per_device": (1, 1 << 22), "questions_per_device": (1, 16384)}


def parse_dns(doc: Any, bad) -> DnsConfig:
    """The `dns:` mapping, or an InputError made by bad(key, what)."""
    if doc is None:
        return DnsConfig()
    known = [f.name for f in fields(DnsConfig)]
    if not isinstance(doc, dict):
        raise bad("dns", f"must be a mapping of {', '.join(known)}")
    values: dict[str, Any] = {}
    for key, v in doc.items():
        if key not in known:
            raise bad("dns", f"unknown setting {key!r} (known: {', '.join(known)})")
        if key == "resolvers":
            values[key] = _resolvers(v, bad)
            continue
        lo, hi = BOUNDS[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise bad(f"dns.{key}", f"must be an integer from {lo} to {hi}, got {v!r}")
        values[key] = v
    cfg = DnsConfig(**values)
    if cfg.min_ttl > cfg.max_ttl:
        raise bad("dns.min_ttl", f"{cfg.min_ttl} is above max_ttl ({cfg.max_ttl})")
    if cfg.max_per_name > cfg.max_total:
        raise bad("dns.max_per_name", f"{cfg.max_per_name} is above max_total ({cfg.max_total})")
    return cfg


def _resolvers(v: Any, bad) -> tuple:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise bad("dns.resolvers", "must be a list of addresses, like [10.20.0.53]")
    out = []
    for item in v:
        try:
            addr = ipaddress.ip_address(str(item))
        except ValueError:
            raise bad("dns.resolvers", f"{item!r} is not an IP address") from None
        if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
            raise bad("dns.resolvers", f"{item} cannot be a resolver that devices reach through the gateway")
        if addr in out:
            raise bad("dns.resolvers", f"{item} is listed twice")
        out.append(addr)
    return tuple(out)
