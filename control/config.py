"""The gateway's configuration file (YAML), validated as strictly as the policy files.

    interface: zt0                 # the WireGuard ingress interface the daemon creates
    listen_port: 51820
    endpoint: 198.18.0.1:51820     # what device clients dial (printed into their configuration)
    routes: [10.20.0.0/16]         # networks this host reaches itself (not through a connector):
                                   # devices route them into their tunnel, the host forwards them
    pool_ipv4: 100.96.0.0/12       # device tunnel addresses; the gateway takes the first
    pool_ipv6: fd00:5a::/64        # null: IPv4 only
    state_dir: /var/lib/ztgate     # the database and the gateway's own WireGuard key
    socket: /run/ztgate/ztgate.sock
    socket_group: ztgate           # operators' group: may use the socket (mode 0660)
    flow_log: /var/log/ztgate/flows.log
    flow_log_max_bytes: 52428800   # rotated at this size
    flow_log_backups: 5
    metrics: 127.0.0.1:9469        # Prometheus endpoint; null: off
    bpf_pin_dir: /sys/fs/bpf/ztgate
    xdp_mode: auto                 # auto (native where the driver has it, else generic), native, generic
    route_table: 51820             # ztgate's own routing table (private prefixes -> connectors)
    route_priority: 1000           # of the rule "iif INTERFACE lookup route_table"
    conntrack:
      entries: 65536               # flows tracked; the least recently used goes when it is full
      tcp: 3600                    # seconds a flow lives after its last packet, either way: TCP, open
      tcp_closing: 10              # TCP, after a FIN or RST
      udp: 120
      icmp: 30                     # ICMP echo
    dns:                           # the DNS slow path (hostname rules): control/dns/settings.py
      resolvers: [10.20.0.53]      # private resolvers whose answers to devices teach names; [] off
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional


from dataplane.layout import POOL_BITS

from .dns.settings import DnsConfig, parse_dns
from .errors import InputError
from .yamlfile import read_yaml

from .socket_default import DEFAULT_SOCKET, socket_path  # noqa: F401  (control/socket_default.py: the CLI's)

IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")


@dataclass(frozen=True)
class Config:
    interface: str = "zt0"
    listen_port: int = 51820
    endpoint: Optional[str] = None
    routes: tuple = ()
    pool_ipv4: ipaddress.IPv4Network = ipaddress.IPv4Network("100.96.0.0/12")
    pool_ipv6: Optional[ipaddress.IPv6Network] = ipaddress.IPv6Network("fd00:5a::/64")
    state_dir: Path = Path("/var/lib/ztgate")
    socket: str = DEFAULT_SOCKET
    socket_group: str = "ztgate"
    flow_log: Path = Path("/var/log/ztgate/flows.log")
    flow_log_max_bytes: int = 50 << 20
    flow_log_backups: int = 5
    metrics: Optional[str] = "127.0.0.1:9469"
    bpf_pin_dir: Path = Path("/sys/fs/bpf/ztgate")
    xdp_mode: str = "auto"
    route_table: int = 51820
    route_priority: int = 1000
    conntrack: tuple = (("entries", 65536), ("tcp", 3600), ("tcp_closing", 10), ("udp", 120), ("icmp", 30))
    identity: Optional[Any] = None     # control.identity.config.IdentityConfig: the IdP and enrollment (issue 14)
    dns: DnsConfig = DnsConfig()           # the DNS slow path: control/dns/settings.py
    source: str = field(default="defaults", compare=False)

    @property
    def gateway_addresses(self) -> list:
        """The gateway's own tunnel addresses: the first host of each pool."""
        out = [ipaddress.ip_interface(f"{self.pool_ipv4.network_address + 1}/{self.pool_ipv4.prefixlen}")]
        if self.pool_ipv6:
            out.append(ipaddress.ip_interface(f"{self.pool_ipv6.network_address + 1}/{self.pool_ipv6.prefixlen}"))
        return out

    @property
    def pool_size(self) -> int:
        """Offsets below this are in both pools (devices take 2 and up: 0 is the network, 1 the gateway)."""
        return min(self.pool_ipv4.num_addresses, 1 << POOL_BITS)

    @property
    def database(self) -> Path:
        return self.state_dir / "ztgate.db"

    @property
    def metrics_address(self) -> Optional[tuple[str, int]]:
        if not self.metrics:
            return None
        host, _, port = self.metrics.rpartition(":")
        return host, int(port)


def load_config(path: Optional[str | Path]) -> Config:
    if path is None:
        return Config()
    doc = read_yaml(path)
    return parse_config(doc, str(path))


def parse_config(doc: Any, source: str = "config") -> Config:
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise InputError(f"{source}: must be a mapping of settings")
    known = [f.name for f in fields(Config) if f.name != "source"]
    for key in doc:
        if key not in known:
            raise InputError(f"{source}: unknown setting {key!r} (known: {', '.join(known)})")
    values: dict[str, Any] = {"source": source}

    def bad(key: str, what: str) -> InputError:
        return InputError(f"{source}: {key}: {what}")

    _scalars(doc, values, bad)
    _prefixes(doc, values, bad)
    _conntrack(doc, values, bad)
    if doc.get("identity") is not None:     # issue 14: the IdP the gateway trusts, its enrollment service
        from .identity.config import parse_identity
        values["identity"] = parse_identity(doc["identity"], bad)
    if "dns" in doc:                        # the DNS slow path: control/dns/settings.py
        values["dns"] = parse_dns(doc["dns"], bad)
    cfg = Config(**values)
    if cfg.pool_ipv4.prefixlen < 32 - POOL_BITS:
        raise bad("pool_ipv4", f"at most 2^{POOL_BITS} addresses (/{32 - POOL_BITS} or longer): "
                               "the kernel indexes the pool with an array of that size")
    return cfg


def _scalars(doc: dict, values: dict, bad) -> None:
    """Names, paths, ports and numbers."""
    def integer(key: str, lo: int, hi: int) -> None:
        if key in doc:
            v = doc[key]
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise bad(key, f"must be an integer from {lo} to {hi}, got {v!r}")
            values[key] = v

    def text(key: str, nullable: bool = False) -> None:
        if key in doc:
            v = doc[key]
            if v is None and nullable:
                values[key] = None
            elif not isinstance(v, str) or not v:
                raise bad(key, f"must be a non-empty string, got {v!r}")
            else:
                values[key] = v

    for key in ("endpoint", "metrics"):
        text(key, nullable=True)
    for key in ("interface", "socket", "socket_group", "xdp_mode", "state_dir", "flow_log", "bpf_pin_dir"):
        text(key)
    integer("listen_port", 1, 65535)
    integer("flow_log_max_bytes", 4096, 1 << 40)
    integer("flow_log_backups", 0, 1000)
    integer("route_table", 1, (1 << 32) - 1)
    integer("route_priority", 2, 32765)     # before the main table's rule (32766); one less is used too
    if values.get("route_table") in (253, 254, 255):
        raise bad("route_table", f"{values['route_table']} is the kernel's own (default, main, local): pick "
                                 "another number, such as 51820")

    if not IFNAME.match(values.get("interface", "zt0")):
        raise bad("interface", f"{values['interface']!r} is not a Linux interface name (1-15 of A-Z a-z 0-9 _ . -)")
    if values.get("xdp_mode", "auto") not in ("auto", "native", "generic"):
        raise bad("xdp_mode", "use auto, native or generic")
    for key in ("state_dir", "flow_log", "bpf_pin_dir"):
        if key in values:
            values[key] = Path(values[key])
    if values.get("endpoint"):
        host, sep, port = values["endpoint"].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise bad("endpoint", f"{values['endpoint']!r} is not HOST:PORT (the address devices dial)")
    if values.get("metrics"):
        host, sep, port = values["metrics"].rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise bad("metrics", f"{values['metrics']!r} is not ADDRESS:PORT (or null to turn metrics off)")


def _prefixes(doc: dict, values: dict, bad) -> None:
    """The routes through this host and the device pools."""
    if "routes" in doc:
        if not isinstance(doc["routes"], list):
            raise bad("routes", "must be a list of prefixes")
        routes = []
        for r in doc["routes"]:
            try:
                routes.append(ipaddress.ip_network(str(r), strict=True))
            except ValueError:
                raise bad("routes", f"{r!r} is not a prefix like 10.20.0.0/16") from None
        values["routes"] = tuple(routes)

    for key, version, longest in (("pool_ipv4", 4, 30), ("pool_ipv6", 6, 124)):
        if key not in doc:
            continue
        v = doc[key]
        if v is None and version == 6:
            values[key] = None
            continue
        try:
            net = ipaddress.ip_network(str(v), strict=True)
        except ValueError:
            raise bad(key, f"{v!r} is not an IPv{version} prefix") from None
        if net.version != version:
            raise bad(key, f"{v!r} is not an IPv{version} prefix")
        if net.prefixlen > longest:
            raise bad(key, f"/{net.prefixlen} is too small for devices (at most /{longest})")
        values[key] = net


def _conntrack(doc: dict, values: dict, bad) -> None:
    """Conntrack's size and timeouts."""
    if "conntrack" in doc:
        ct = doc["conntrack"]
        defaults = dict(Config.conntrack)
        if not isinstance(ct, dict):
            raise bad("conntrack", f"must be a mapping of {', '.join(defaults)} to numbers")
        for k, v in ct.items():
            if k not in defaults:
                raise bad("conntrack", f"unknown timeout {k!r} (known: {', '.join(defaults)})")
            lo, hi, unit = (1024, 1 << 24, "flows") if k == "entries" else (1, 7 * 86400, "seconds")
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise bad(f"conntrack.{k}", f"must be {unit} from {lo} to {hi}, got {v!r}")
        values["conntrack"] = tuple({**defaults, **ct}.items())
