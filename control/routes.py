"""Routes into private networks, with pyroute2, in the network namespace of the calling thread.

The host's own routing is left alone: ztgate's routes live in a routing table of its own
(Config.route_table), which a policy rule (one per IP version, Config.route_priority) selects
for packets arriving on the ingress interface, and for nothing else. The table holds:

  - each private prefix -> the interface of the connector that serves it;
  - the device pools -> the ingress interface (device to device, if the policy allows it);
  - an "unreachable" default for each IP version, so that a device's packet to anywhere
    else stops here instead of falling through to the host's main table (the underlay).
Networks the gateway host reaches by its own routing (the config's `routes`) get a rule of
their own, just before, that sends device packets to them through the main table.

Replies come back on connector interfaces and reach devices through the main table, where the
ingress interface's own addresses put the pools. Forwarding is turned on per interface
(ingress and connectors only), so the gateway never forwards between its underlay ports.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Union

from pyroute2 import IPRoute, NetlinkError

from .errors import KernelError

log = logging.getLogger("ztgate.routes")
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
FAMILIES = ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0"))
RTN_UNICAST = 1
MAIN_TABLE = 254
PROC = Path("/proc/sys/net")


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise KernelError(f"no interface {ifname} in this network namespace")
    return found[0]


def _family(net: Network) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def install_rules(table: int, priority: int, ingress: str, host_routes: tuple = (), ipv6: bool = True) -> None:
    """`iif INGRESS lookup TABLE` (for IPv4, and IPv6 unless ipv6 is False), the table's
    unreachable defaults, and, one step earlier, `iif INGRESS to PREFIX lookup main` for each
    of HOST_ROUTES (networks the gateway host reaches by its own routing: the config's
    `routes`). Other rules for INGRESS at these two priorities (left by an older
    configuration) are removed: a stale one would send devices around the connectors."""
    families = FAMILIES if ipv6 else FAMILIES[:1]
    wanted = {(f, table, priority, None) for f, _ in families}
    wanted |= {(_family(p), MAIN_TABLE, priority - 1, p) for p in host_routes
               if ipv6 or p.version == 4}
    with IPRoute() as ipr:
        have = {}
        for f, _ in FAMILIES:
            for r in ipr.get_rules(family=f):
                if r.get_attr("FRA_IIFNAME") == ingress and r.get_attr("FRA_PRIORITY") in (priority, priority - 1):
                    have[(r["family"], r.get_attr("FRA_TABLE"), r.get_attr("FRA_PRIORITY"), _rule_dst(r))] = r
        for key, rule in have.items():
            if key not in wanted:
                family, tab, prio, dst = key
                extra = {"dst": str(dst.network_address), "dst_len": dst.prefixlen} if dst else {}
                ipr.rule("del", family=family, table=tab, priority=prio, iifname=ingress, **extra)
                log.info("removed a stale rule: iif %s%s lookup %s (priority %d)", ingress,
                         f" to {dst}" if dst else "", tab, prio)
        for family, tab, prio, dst in wanted - set(have):
            extra = {"dst": str(dst.network_address), "dst_len": dst.prefixlen} if dst else {}
            try:
                ipr.rule("add", family=family, table=tab, priority=prio, iifname=ingress, **extra)
            except NetlinkError as e:
                raise KernelError(f"cannot add the policy-routing rule for {ingress} (table {tab}): {e}") from None
        for family, default in families:
            try:
                ipr.route("replace", family=family, dst=default, table=table, type="unreachable")
            except NetlinkError as e:
                raise KernelError(f"cannot add the unreachable default to table {table}: {e}") from None


def _rule_dst(rule):
    dst = rule.get_attr("FRA_DST")
    return ipaddress.ip_network(f"{dst}/{rule['dst_len']}") if dst else None


def remove_rules(table: int, priority: int, ingress: str) -> bool:
    """Undo install_rules and empty the table. True if anything was there."""
    found = False
    with IPRoute() as ipr:
        for family, _ in FAMILIES:
            for r in ipr.get_rules(family=family):
                if r.get_attr("FRA_IIFNAME") == ingress and r.get_attr("FRA_PRIORITY") in (priority, priority - 1):
                    dst = _rule_dst(r)
                    extra = {"dst": str(dst.network_address), "dst_len": dst.prefixlen} if dst else {}
                    ipr.rule("del", family=family, table=r.get_attr("FRA_TABLE"), priority=r.get_attr("FRA_PRIORITY"),
                             iifname=ingress, **extra)
                    found = True
            for route in _table_routes(ipr, family, table):
                _delete(ipr, route)
                found = True
    return found


def _table_routes(ipr: IPRoute, family: int, table: int) -> list:
    try:
        return [r for r in ipr.get_routes(family=family, table=table) if r.get_attr("RTA_TABLE") == table]
    except NetlinkError:
        return []


def _delete(ipr: IPRoute, route) -> None:
    dst = route.get_attr("RTA_DST") or ("0.0.0.0" if route["family"] == socket.AF_INET else "::")
    try:
        ipr.route("del", family=route["family"], dst=f"{dst}/{route['dst_len']}", table=route.get_attr("RTA_TABLE"),
                  type=route["type"])
    except NetlinkError as e:
        if e.code != errno.ESRCH:
            raise KernelError(f"cannot delete route {dst}/{route['dst_len']}: {e}") from None


def routes(table: int) -> dict[Network, str]:
    """The unicast routes of TABLE: prefix -> interface name."""
    out = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family, _ in FAMILIES:
            for r in _table_routes(ipr, family, table):
                if r["type"] != RTN_UNICAST:
                    continue
                dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                out[ipaddress.ip_network(f"{dst}/{r['dst_len']}")] = names.get(r.get_attr("RTA_OIF"), "?")
    return out


def set_route(table: int, prefix: Network, ifname: str) -> None:
    """PREFIX -> IFNAME in TABLE (replacing what that prefix had)."""
    with IPRoute() as ipr:
        try:
            ipr.route("replace", family=_family(prefix), dst=str(prefix), table=table, oif=_index(ipr, ifname))
        except NetlinkError as e:
            raise KernelError(f"cannot route {prefix} to {ifname} (table {table}): {e}") from None


def remove_route(table: int, prefix: Network) -> None:
    """Remove PREFIX from TABLE (nothing if it is not there)."""
    with IPRoute() as ipr:
        try:
            ipr.route("del", family=_family(prefix), dst=str(prefix), table=table)
        except NetlinkError as e:
            if e.code != errno.ESRCH:
                raise KernelError(f"cannot remove the route to {prefix} (table {table}): {e}") from None


def sync(table: int, wanted: dict[Network, str]) -> None:
    """Make TABLE's unicast routes exactly WANTED (prefix -> interface)."""
    for prefix, ifname in routes(table).items():
        if prefix not in wanted:
            remove_route(table, prefix)
    for prefix, ifname in wanted.items():
        set_route(table, prefix, ifname)


def enable_forwarding(ifname: str, connector: bool = False) -> list[tuple[Path, str]]:
    """Forward packets that arrive on IFNAME (only there: IPv4's forwarding switch is per input
    interface; IPv6 has force_forwarding per interface since Linux 6.17). On connector
    interfaces reverse-path filtering is off for the interface: the replies' sources are
    routed in ztgate's table, which the kernel's reverse-path check does not consult, and
    WireGuard's allowed IPs already admit only the connector's prefixes as sources. (The
    kernel uses the larger of the interface's and `all`'s rp_filter: host_warnings() says
    when `all` overrides this.) Returns what it changed, each with the value it had:
    restore_settings() puts them back (an interface ztgate did not make)."""
    settings = [(PROC / "ipv4/conf" / ifname / "forwarding", "1")]
    v6 = PROC / "ipv6/conf" / ifname / "force_forwarding"
    if v6.exists():
        settings.append((v6, "1"))
    elif (PROC / "ipv6/conf" / ifname).exists():
        log.warning("%s: this kernel has no per-interface IPv6 forwarding (force_forwarding): IPv6 is not "
                    "forwarded unless net.ipv6.conf.all.forwarding is 1", ifname)
    if connector:
        settings.append((PROC / "ipv4/conf" / ifname / "rp_filter", "0"))
    changed = []
    for path, value in settings:
        try:
            before = path.read_text().strip()
            if before != value:
                path.write_text(value)
                changed.append((path, before))
        except OSError as e:
            restore_settings(changed)
            raise KernelError(f"cannot set {path} to {value}: {e.strerror}") from None
    return changed


def restore_settings(changed: list[tuple[Path, str]]) -> None:
    """Put back what enable_forwarding() changed (an interface gone since has nothing to put back)."""
    for path, before in reversed(changed):
        try:
            path.write_text(before)
        except OSError as e:
            log.warning("could not put %s back to %s: %s", path, before, e.strerror)


def set_link(ifname: str, up: bool) -> None:
    with IPRoute() as ipr:
        try:
            ipr.link("set", index=_index(ipr, ifname), state="up" if up else "down")
        except NetlinkError as e:
            raise KernelError(f"cannot set {ifname} {'up' if up else 'down'}: {e}") from None


def host_warnings(routed: tuple = ()) -> list[str]:
    """Settings of this network namespace that weaken what ztgate promises; ROUTED: the
    config's `routes`, networks this host forwards to itself."""
    out = []
    if routed:
        out.append(f"routes {', '.join(map(str, routed))} are forwarded by this host itself, not through a "
                   "connector: what devices send there is decided by ztgate, but what comes back arrives on "
                   "an underlay interface that no ztgate program filters, so those hosts can open connections "
                   "to devices; put such networks behind a connector (`ztgate connector add`) to protect "
                   "the way back too")

    def read(path: str) -> str:
        try:
            return (PROC / path).read_text().strip()
        except OSError:
            return ""
    if read("ipv4/conf/all/forwarding") == "1" or read("ipv6/conf/all/forwarding") == "1":
        out.append("forwarding is on for every interface (net.ipv4.ip_forward or net.ipv6.conf.all.forwarding "
                   "is 1): packets arriving on other interfaces than the connectors' can reach devices without "
                   "the connector-side check. ztgate turns forwarding on where it needs it; set these to 0 unless "
                   "the config's `routes` need them")
    if read("ipv4/conf/all/rp_filter") in ("1", "2"):
        out.append("net.ipv4.conf.all.rp_filter is on: replies from connectors whose sources the main table "
                   "does not route back through them are dropped; set it to 0 (WireGuard checks sources)")
    return out
