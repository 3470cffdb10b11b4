"""The WireGuard and routing side of a change, as steps the core stages and applies: a
device's peer, a connector's interface and peer, a route. Kernel steps come from Kernel."""
from __future__ import annotations

from .. import routes, wireguard
from ..config import Config
from ..kernel import Kernel, Staged
from ..model import Connector, Device, Identities


def own_prefixes(d: Device) -> list[str]:
    """A device's peer admits only its own addresses."""
    return [f"{a}/{a.max_prefixlen}" for a in d.addresses]


def device_peers(identities: Identities) -> list:
    """Every enrolled device's peer; a disabled device's admits no address (see peer_step)."""
    return [wireguard.Peer(d.public_key, tuple(own_prefixes(d)) if d.enabled else ())
            for d in identities.devices if d.public_key]


def peer_step(config: Config, device: Device, admit: bool, remove: bool = False) -> Staged:
    """A device's peer, after the commit: admitting the device's addresses; or admitting
    none (a disabled device: WireGuard takes nothing from it and routes nothing to it, while
    its session lives on, so that `device enable` works at once instead of after the ~15 s
    the device's WireGuard would take to notice a lost session); or removed (a removed
    device: its key may not even handshake any more)."""
    iface, key = config.interface, device.public_key
    if remove:
        return Staged(lambda: wireguard.remove_peer(iface, key), lambda: None)
    prefixes = own_prefixes(device) if admit else []
    return Staged(lambda: wireguard.add_peer(iface, key, prefixes), lambda: None)


def kept_peers_step(config: Config, old: Identities, new: Identities) -> Staged:
    """Before a swap to NEW: each device peer admits only what it admits in OLD and in NEW
    alike (a peer that goes, or whose addresses go to others, admits none of them)."""
    after = {p.public_key: set(p.allowed_ips) for p in device_peers(new)}
    peers = [wireguard.Peer(p.public_key, tuple(a for a in p.allowed_ips if a in after.get(p.public_key, ())))
             for p in device_peers(old)]
    return Staged(lambda: wireguard.set_peers(config.interface, peers, replace=True), lambda: None)


def all_peers_step(config: Config, identities: Identities) -> Staged:
    """Every device peer replaced at once, as IDENTITIES has them (policy apply)."""
    peers = device_peers(identities)
    return Staged(lambda: wireguard.set_peers(config.interface, peers, replace=True), lambda: None)


def connector_peer(c: Connector) -> None:
    """The connector's peer admits exactly its routes (what it may send from, and what is
    sent to it); forwarding of what the connector-side program lets through."""
    wireguard.set_peers(c.interface, [wireguard.Peer(c.public_key, c.routes)], replace=True)
    routes.enable_forwarding(c.interface, connector=True)


def stage_connector(kernel: Kernel, c: Connector) -> Staged:
    """Made before the commit (the port may be taken, the program may not attach): the
    interface, with the connector-side program on it before it has a peer. Applied: the
    peer, and forwarding of what the program lets through."""
    wireguard.ensure_interface(c.interface, c.private_key, c.listen_port, [])
    try:
        kernel.attach_reply(c.interface)
    except BaseException:
        wireguard.delete_interface(c.interface)
        raise

    def discard() -> None:
        kernel.detach_reply(c.interface)
        wireguard.delete_interface(c.interface)
    return Staged(lambda: connector_peer(c), discard)


def connector_gone_step(kernel: Kernel, c: Connector) -> Staged:
    def apply() -> None:
        kernel.detach_reply(c.interface)
        wireguard.delete_interface(c.interface)
    return Staged(apply, lambda: None)


def route_step(config: Config, c: Connector, net, add: bool) -> Staged:
    """C as it is after the change: its peer admits exactly its routes; the route goes in
    after the peer admits it and out before it stops."""
    peer = [wireguard.Peer(c.public_key, c.routes)]

    def apply() -> None:
        if add:
            wireguard.set_peers(c.interface, peer, replace=True)
            routes.set_route(config.route_table, net, c.interface)
        else:
            routes.remove_route(config.route_table, net)
            wireguard.set_peers(c.interface, peer, replace=True)
    return Staged(apply, lambda: None)
