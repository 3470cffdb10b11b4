"""Connectors (a private network's tunnel into the gateway) and the routes of private prefixes
to them."""
from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import replace
from typing import Any, Optional

from .. import routes, wireguard
from ..connector import connector_config
from ..errors import InputError, ZtError
from ..model import Connector
from . import steps
from .core import ONLINE_SECONDS, Core, Plan

CONNECTOR_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,10}\Z")   # its interface is ztc-NAME (15 at most)


class ConnectorOps(Core):
    def _connector(self, name: Any) -> Connector:
        for c in self.connectors:
            if c.name == name:
                return c
        raise InputError(f"no connector named {name!r} (see `ztgate connector list`)")

    def connector_list(self) -> list[dict]:
        with self.lock:
            out = []
            for c in self.connectors:
                try:
                    peer = wireguard.show(c.interface).peer(c.public_key)
                except ZtError:
                    peer = None
                out.append({
                    "name": c.name, "interface": c.interface, "listen_port": c.listen_port,
                    "public_key": c.public_key, "routes": [str(r) for r in c.routes],
                    "endpoint": peer.endpoint if peer else None,
                    "last_handshake": peer.last_handshake if peer and peer.last_handshake else None,
                    "online": bool(peer and peer.last_handshake and time.time() - peer.last_handshake < ONLINE_SECONDS),
                    "rx_bytes": peer.rx_bytes if peer else 0, "tx_bytes": peer.tx_bytes if peer else 0,
                })
            return out

    def _free_port(self, name: str, listen_port: Optional[int]) -> int:
        if not CONNECTOR_NAME.match(name):
            raise InputError(f"connector name {name!r} must match [a-z0-9][a-z0-9-]{{0,10}} "
                             "(its interface on the gateway is ztc-NAME)")
        if any(c.name == name for c in self.connectors):
            raise InputError(f"connector {name!r} exists already (remove it first, or pick another name)")
        if not self.config.endpoint:
            raise InputError(f"{self.config.source}: set endpoint (HOST:PORT devices dial) to add connectors: "
                             "they dial the same host")
        used = {self.config.listen_port} | {c.listen_port for c in self.connectors}
        if listen_port is None:
            return next(p for p in range(self.config.listen_port + 1, 65536) if p not in used)
        if listen_port in used or not 1 <= listen_port <= 65535:
            raise InputError(f"port {listen_port} is taken or out of range: the gateway listens on "
                             f"{', '.join(map(str, sorted(used)))}")
        return listen_port

    def connector_add(self, uid: int, name: str, listen_port: Optional[int]) -> dict:
        with self.lock:
            listen_port = self._free_port(name, listen_port)
            gateway_private, _ = wireguard.generate_keypair()
            connector_private, connector_public = wireguard.generate_keypair()
            c = Connector(name, f"ztc-{name}", listen_port, gateway_private, connector_public)
            out = self._commit(uid, Plan("connector add", {"name": name, "interface": c.interface,
                                                           "listen_port": listen_port},
                                         replace(self.state, connectors=self.connectors + (c,)),
                                         lambda tx: tx.add_connector(c),
                                         [lambda gen: steps.stage_connector(self.kernel, c)]))
            host = self.config.endpoint.rpartition(":")[0]
            return dict(out, connector=name, interface=c.interface, listen_port=listen_port,
                        config=connector_config(name, connector_private, wireguard.public_key_of(gateway_private),
                                                f"{host}:{listen_port}",
                                                [str(a.network) for a in self.config.gateway_addresses]))

    def connector_remove(self, uid: int, name: str) -> dict:
        with self.lock:
            c = self._connector(name)
            if c.routes:
                raise InputError(f"connector {name!r} serves {', '.join(map(str, c.routes))}: remove those routes "
                                 "first (ztgate route remove PREFIX)")
            return self._commit(uid, Plan("connector remove", {"name": name},
                                          replace(self.state, connectors=tuple(x for x in self.connectors if x.name != name)),
                                          lambda tx: tx.remove_connector(name),
                                          [lambda gen: steps.connector_gone_step(self.kernel, c)]))

    # -----------------------------------------------------------------------------------------
    # routes

    def route_list(self) -> list[dict]:
        with self.lock:
            installed = routes.routes(self.config.route_table)
            return [{"prefix": str(p), "connector": c.name, "interface": c.interface,
                     "installed": installed.get(p) == c.interface}
                    for c in self.connectors for p in c.routes]

    def route_add(self, uid: int, prefix: str, connector: str) -> dict:
        with self.lock:
            net = _prefix(prefix)
            c = self._connector(connector)
            check_private_prefix(net, self.config.endpoint)
            self._check_unclaimed(net)
            new = replace(c, routes=c.routes + (net,))
            return self._commit(uid, Plan("route add", {"prefix": str(net), "connector": c.name},
                                          self._with_connector(new), lambda tx: tx.add_route(net, c.name),
                                          [lambda gen: steps.route_step(self.config, new, net, True)]))

    def _check_unclaimed(self, net) -> None:
        """No other connector's prefix, the host's own routes or the device pools overlap NET."""
        for other in self.connectors:
            for p in other.routes:
                if p == net:
                    raise InputError(f"{net} is routed to connector {other.name!r} already")
                if p.version == net.version and net.overlaps(p):
                    raise InputError(f"{net} overlaps {p}, routed to connector {other.name!r}: remove that "
                                     "route first (ztgate route remove), or route a prefix that does not overlap")
        for p in self.config.routes:
            if p.version == net.version and net.overlaps(p):
                raise InputError(f"{net} overlaps {p}, which {self.config.source} routes through this host "
                                 "itself (`routes`): pick one way to reach it")
        for a in self.config.gateway_addresses:
            if a.network.version == net.version and net.overlaps(a.network):
                raise InputError(f"{net} overlaps the device pool {a.network}: private prefixes must lie "
                                 "outside the tunnel pools")

    def route_remove(self, uid: int, prefix: str) -> dict:
        with self.lock:
            net = _prefix(prefix)
            c = next((x for x in self.connectors if net in x.routes), None)
            if c is None:
                raise InputError(f"no route for {net} (see `ztgate route list`)")
            new = replace(c, routes=tuple(p for p in c.routes if p != net))
            return self._commit(uid, Plan("route remove", {"prefix": str(net), "connector": c.name},
                                          self._with_connector(new), lambda tx: tx.remove_route(net),
                                          [lambda gen: steps.route_step(self.config, new, net, False)]))

    def _with_connector(self, new: Connector):
        return replace(self.state, connectors=tuple(new if c.name == new.name else c for c in self.connectors))


def _prefix(text: str):
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise InputError(f"{text!r} is not a prefix like 10.20.0.0/16 (with the host bits zero)") from None


def check_private_prefix(net, endpoint: Optional[str]) -> None:
    """What no connector can serve: addresses that are not unicast to somewhere else, and the
    gateway's own endpoint (devices would send their tunnel into the tunnel)."""
    if net.prefixlen == 0:
        raise InputError(f"{net}: a default route cannot go to a connector (route the private prefixes)")
    for what, flag in (("loopback", net.is_loopback), ("multicast", net.is_multicast),
                       ("link-local", net.is_link_local), ("unspecified", net.network_address.is_unspecified)):
        if flag:
            raise InputError(f"{net} is {what}: only unicast private prefixes can be routed to a connector")
    host = (endpoint or "").rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return          # a name: the operator knows what it resolves to
    if ip.version == net.version and ip in net:
        raise InputError(f"{net} holds the gateway's endpoint {ip}: devices would route their tunnel into "
                         "itself; route a prefix without it")
