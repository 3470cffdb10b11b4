"""The connector: runs inside a private network, dials out to the gateway (so the network needs
no inbound hole and no public address) and forwards between its tunnel and the LAN.

What it sets up, all in the network namespace it runs in:
  - a WireGuard interface whose one peer is the gateway, dialled at gateway_endpoint, with a
    keepalive; the peer admits the device pools only (what devices send from, and where
    replies go);
  - routes of the device pools into the tunnel (replies from the LAN go back through it);
  - forwarding on the tunnel and on the LAN interfaces only: the connector never forwards
    from its uplink, so nothing reaches the private network around the gateway; and what
    comes in from the LAN is routed by a table of its own (the device pools, then
    unreachable), so the LAN cannot use the connector to reach the uplink's networks either.
Stopping it (SIGTERM, SIGINT) removes the interface, its routes and rules, and puts the LAN
interfaces' forwarding settings back as they were.
"""
from __future__ import annotations

import ipaddress
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import yaml
from pyroute2 import IPRoute

from . import routes, wireguard
from .config import IFNAME
from .errors import InputError, KernelError
from .yamlfile import read_yaml

KEEPALIVE = 25                # seconds: a connector keeps its tunnel (and NAT mappings) up
HANDSHAKE_WAIT = 10.0      # seconds to wait for the first handshake before saying so
LAN_TABLE, LAN_PRIORITY = 51821, 1000   # the connector host's own table for packets from the LAN


@dataclass(frozen=True)
class ConnectorConfig:
    name: str
    interface: str
    private_key: str
    gateway_public_key: str
    gateway_endpoint: str          # HOST:PORT
    device_networks: tuple         # ipaddress networks
    keepalive: int
    source: str


def load_connector_config(path: str) -> ConnectorConfig:
    doc = read_yaml(path)
    return parse_connector_config(doc, path)


def connector_config(name: str, private_key: str, gateway_public_key: str, endpoint: str, device_networks: list) -> str:
    """What `ztgate connector add` prints and `ztgate connector run` reads, inside the private network."""
    doc = {"name": name, "interface": f"ztr-{name}", "private_key": private_key,
           "gateway_public_key": gateway_public_key, "gateway_endpoint": endpoint,
           "device_networks": device_networks, "keepalive": KEEPALIVE}
    return (f"# ztgate connector {name!r}: run it inside the private network with\n"
            f"#   ztgate connector run THIS-FILE [--lan IFACE]\n"
            "# It dials out to the gateway (no inbound port to open). The private key is printed once\n"
            "# and not kept by the gateway: keep this file like a password.\n" + yaml.safe_dump(doc, sort_keys=False))


def parse_connector_config(doc: Any, source: str) -> ConnectorConfig:
    keys = ("name", "interface", "private_key", "gateway_public_key", "gateway_endpoint", "device_networks",
            "keepalive")
    if not isinstance(doc, dict):
        raise InputError(f"{source}: must be a mapping (the file `ztgate connector add` printed)")
    for key in doc:
        if key not in keys:
            raise InputError(f"{source}: unknown setting {key!r} (known: {', '.join(keys)})")
    for key in keys:
        if key not in doc:
            raise InputError(f"{source}: {key} is missing (use the file `ztgate connector add` printed)")

    def bad(key: str, what: str) -> InputError:
        return InputError(f"{source}: {key}: {what}")

    for key in ("name", "interface", "private_key", "gateway_public_key", "gateway_endpoint"):
        if not isinstance(doc[key], str) or not doc[key]:
            raise bad(key, f"must be a non-empty string, got {doc[key]!r}")
    if not IFNAME.match(doc["interface"]):
        raise bad("interface", f"{doc['interface']!r} is not a Linux interface name (1-15 of A-Z a-z 0-9 _ . -)")
    wireguard.public_key_of(doc["private_key"])           # a clear error if it is no key
    wireguard.check_public_key(doc["gateway_public_key"])
    host, sep, port = doc["gateway_endpoint"].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad("gateway_endpoint", f"{doc['gateway_endpoint']!r} is not HOST:PORT")
    nets = doc["device_networks"]
    if not isinstance(nets, list) or not nets:
        raise bad("device_networks", "must be a list of prefixes (the gateway's device pools)")
    try:
        networks = tuple(ipaddress.ip_network(str(n), strict=True) for n in nets)
    except ValueError as e:
        raise bad("device_networks", f"{e}") from None
    for n in networks:
        if n.prefixlen == 0:
            raise bad("device_networks", f"{n} would take this host's default route: list the device pools")
    k = doc["keepalive"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 65535:
        raise bad("keepalive", f"must be seconds from 1 to 65535, got {k!r} (a connector always keeps its tunnel up)")
    return ConnectorConfig(doc["name"], doc["interface"], doc["private_key"], doc["gateway_public_key"],
                           doc["gateway_endpoint"], networks, k, source)


def resolve_endpoint(endpoint: str) -> str:
    """HOST:PORT -> IP:PORT (WireGuard takes addresses), "[v6]:port" for IPv6."""
    host, _, port = endpoint.rpartition(":")
    try:
        info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise KernelError(f"gateway_endpoint {endpoint}: cannot resolve {host}: {e.strerror}") from None
    family, _, _, _, addr = info[0]
    return f"[{addr[0]}]:{port}" if family == socket.AF_INET6 else f"{addr[0]}:{port}"


def lan_interface(tunnel: str, gateway_ip: str) -> str:
    """The one interface that is not loopback, the tunnel or the uplink (the one that reaches
    the gateway); with more than one candidate the operator names it."""
    with IPRoute() as ipr:
        uplink = ipr.route("get", dst=gateway_ip)[0].get_attr("RTA_OIF")
        found = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                 if link["index"] != uplink and link.get_attr("IFLA_IFNAME") not in ("lo", tunnel)]
    if len(found) != 1:
        raise InputError(f"name the LAN interface with --lan (candidates: {', '.join(found) or 'none'}; the "
                         "uplink towards the gateway is never one)")
    return found[0]


def _say(text: str) -> None:
    print(f"ztgate connector: {text}", flush=True)


def run_connector(cfg: ConnectorConfig, lans: Optional[list[str]] = None) -> int:
    endpoint = resolve_endpoint(cfg.gateway_endpoint)
    gateway_ip = endpoint.rpartition(":")[0].strip("[]")
    if lans:
        with IPRoute() as ipr:
            for name in lans:
                if not ipr.link_lookup(ifname=name):
                    raise InputError(f"--lan {name}: no such interface here")
    else:
        lans = [lan_interface(cfg.interface, gateway_ip)]
    if wireguard.exists(cfg.interface):
        raise InputError(f"{cfg.interface} exists already: is this connector running? (stop it first)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kind = wireguard.ensure_interface(cfg.interface, cfg.private_key, 0, [])
    changed: list = []       # the LAN interfaces' forwarding settings as they were
    try:
        _say(f"{cfg.interface} up ({kind} WireGuard), dialling the gateway at {endpoint}")
        wireguard.set_peers(cfg.interface, [wireguard.Peer(cfg.gateway_public_key, cfg.device_networks, endpoint,
                                                           cfg.keepalive)], replace=True)
        for net in cfg.device_networks:
            routes.set_route(routes.MAIN_TABLE, net, cfg.interface)
            routes.set_route(LAN_TABLE, net, cfg.interface)
        # What comes in on a LAN interface may go to devices and nowhere else (not out of the
        # uplink): the same own-table-and-rule as the gateway's, for each LAN interface.
        for name in lans:
            routes.install_rules(LAN_TABLE, LAN_PRIORITY, name,
                                 ipv6=any(n.version == 6 for n in cfg.device_networks))
        routes.enable_forwarding(cfg.interface)
        for name in lans:
            changed += routes.enable_forwarding(name)
        _say(f"device networks {', '.join(map(str, cfg.device_networks))} routed into {cfg.interface}; "
             f"forwarding between it and {', '.join(lans)}")
        deadline = time.time() + HANDSHAKE_WAIT
        while not stop.is_set():
            peer = wireguard.show(cfg.interface).peer(cfg.gateway_public_key)
            if peer and peer.last_handshake:
                _say(f"connected to the gateway (handshake {int(time.time() - peer.last_handshake)}s ago)")
                break
            if time.time() > deadline:
                _say("no handshake with the gateway yet: is the connector added there (`ztgate connector list`), "
                     "and is its port reachable from here? Still trying.")
                break
            stop.wait(0.2)
        stop.wait()
        _say("stopping")
    finally:
        wireguard.delete_interface(cfg.interface)
        for name in lans:
            routes.remove_rules(LAN_TABLE, LAN_PRIORITY, name)
        routes.restore_settings(changed)
        _say(f"{cfg.interface} removed, with its routes and rules; forwarding on {', '.join(lans)} as it was")
    return 0
