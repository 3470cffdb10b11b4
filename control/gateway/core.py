"""The gateway's core: the lock, the in-memory state, the transaction every change goes
through, start, rebuild and fail closed. The operations (beside this file) only validate a
request and state a Plan; the core runs it.

A change is validated first (a bad request changes nothing), then made inside one store
transaction: the kernel and the WireGuard peers are staged before the commit (where a change
can still fail) and applied after it. A controller killed in the middle leaves the store
whole (SQLite) and the kernel enforcing what it enforced, never a change the store does not
hold; start() makes kernel and peers equal to the store again.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import routes, wireguard
from ..config import Config
from ..errors import InputError, KernelError
from ..kernel import Kernel, Staged, program_on
from ..model import Connector, Device, Identities, Policy, User
from ..store import Change, Store
from . import steps
from .faults import fault, pause

log = logging.getLogger("ztgate.gateway")
ONLINE_SECONDS = 180          # a device or connector with a handshake this recent counts as online


@dataclass(frozen=True)
class State:
    """What the controller holds in memory: always what the store's last commit holds."""
    identities: Identities
    policy: Policy
    connectors: tuple[Connector, ...]


@dataclass
class Plan:
    """One change, as an operation states it once the request is valid.

    write(tx) makes the store writes; each of `steps` (given the new generation) stages one
    kernel or WireGuard step, in order, before the commit; they are applied in that order
    after it (kernel before peers when access is taken away). `state` is the controller's
    view once the change is committed; `owners` (device name -> user) names devices in the
    flow log, also after they are removed."""
    what: str
    detail: dict
    state: State
    write: Callable[[Change], None]
    steps: list[Callable[[int], Staged]] = field(default_factory=list)
    owners: dict = field(default_factory=dict)


class Core:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.database)
        self.state = self._stored()
        self.kernel = Kernel(config)
        self.lock = threading.RLock()
        self.owner: dict[str, str] = {}            # device name -> user, also of removed devices
        self.started = time.time()
        self.wg_kind = ""
        self.public_key = ""

    @property
    def identities(self) -> Identities:
        return self.state.identities

    @property
    def policy(self) -> Policy:
        return self.state.policy

    @property
    def connectors(self) -> tuple[Connector, ...]:
        return self.state.connectors

    def _user(self, email: Any) -> User:
        try:
            return self.identities.user(email)
        except (KeyError, AttributeError):
            raise InputError(f"no user {email!r} (see `ztgate user list`)") from None

    def _device(self, name: Any) -> Device:
        found = self.identities.find_device(name) if isinstance(name, str) else None
        if found is not None:
            return found
        raise InputError(f"no device named {name!r} (see `ztgate device list`)")

    def _stored(self) -> State:
        return State(self.store.identities(), self.store.policy(), tuple(self.store.connectors()))

    def _adopt(self, state: State, owners: dict) -> None:
        """The one place the in-memory state changes after start."""
        self.state = state
        self.owner.update(owners)

    def _warm_lookups(self) -> None:
        """Work out now, after a start or a whole apply (seconds at 100k devices anyway), the
        lookups a device add or a membership change needs (users by key, devices by name, the
        first free pool address: control/lookups.py): the changes carry them over, so the
        first such change does not pay for them."""
        base = int(self.config.pool_ipv4.network_address)
        self.identities.work_out_lookups()
        self.identities.first_free_ipv4(base + 2, base + self.config.pool_size)

    # -----------------------------------------------------------------------------------------
    # the transaction every change goes through

    def _commit(self, uid: int, plan: Plan) -> dict:
        """Run PLAN: store writes and staged steps in one transaction (a step that cannot be
        staged rolls the store back and discards the steps staged before it: nothing moved),
        then every step applied; if one fails, the data plane is rebuilt whole from the store."""
        later: list[Staged] = []
        try:
            with self.store.change(uid, plan.what, plan.detail) as tx:
                plan.write(tx)
                for stage in plan.steps:
                    later.append(stage(tx.generation))
                pause("before-commit")
        except BaseException:
            for step in later:
                step.discard()
            raise
        pause("after-commit")
        failed = []
        for step in later:          # every step is tried: one failing must not skip a revocation
            try:
                fault("apply", step)
                step.apply()
            except Exception as e:
                log.exception("applying generation %d (%s)", self.store.generation(), plan.what)
                failed.append(str(e))
        # The store holds the change: so does the controller's view of it from here on (read
        # back from the store when a step failed, and the data plane rebuilt whole from it).
        self._adopt(self._stored() if failed else plan.state, plan.owners)
        if failed:
            self._rebuild_after(plan.what, failed)
        log.info("generation %d: %s %s", self.store.generation(), plan.what, plan.detail)
        return {"generation": self.store.generation()}

    def _rebuild_after(self, what: str, failed: list[str]) -> None:
        try:
            self._rebuild()
        except Exception as e:
            log.exception("rebuilding the data plane from generation %d", self.store.generation())
            raise KernelError(f"generation {self.store.generation()} ({what}) is stored, but the data plane "
                              f"could not follow: {'; '.join(failed)}; nor could a whole rebuild: {e}. "
                              "Restart the gateway to make it equal to the store.") from e
        log.warning("generation %d (%s): a step failed (%s); the data plane was rebuilt whole from the store",
                    self.store.generation(), what, "; ".join(failed))

    # -----------------------------------------------------------------------------------------
    # start: make the kernel and the peers equal to the store

    def start(self) -> None:
        """Interfaces first (a new one has no peers: nothing arrives yet), then the build
        attached to ingress and connector interfaces, then peers, forwarding and routes: no
        packet is forwarded before a program decides it."""
        with self.lock:
            private = self._gateway_key()
            self.public_key = wireguard.public_key_of(private)
            cfg = self.config
            self.wg_kind = wireguard.ensure_interface(cfg.interface, private, cfg.listen_port,
                                                      cfg.gateway_addresses)
            self._sync_connector_interfaces()
            try:
                fault("load")
                self.kernel.stage_swap(self.identities, self.policy, self.store.generation()).apply()
            except BaseException as e:
                self._fail_closed(e)
                raise
            self._forget_stray_flows()
            # routing before peers and forwarding: no device packet meets the main table first
            routes.install_rules(cfg.route_table, cfg.route_priority, cfg.interface, cfg.routes,
                                 ipv6=cfg.pool_ipv6 is not None)
            self._sync_routes_peers_forwarding()
            for warning in routes.host_warnings(tuple(self.config.routes)):
                log.warning("%s", warning)
            self.owner.update((d.name, d.user) for d in self.identities.devices)
            self._warm_lookups()
            log.info("gateway up on %s (%s WireGuard), %d connectors, generation %d", cfg.interface, self.wg_kind,
                     len(self.connectors), self.store.generation())

    def _sync_connector_interfaces(self) -> None:
        """The store's connectors each have their interface, which the next build's connector
        side is attached to; a removed connector's interface goes."""
        wanted = [c.interface for c in self.connectors]
        for ifname in [i for i in self.kernel.reply_interfaces if i not in wanted]:
            self.kernel.detach_reply(ifname)
            wireguard.delete_interface(ifname)
        for c in self.connectors:
            wireguard.ensure_interface(c.interface, c.private_key, c.listen_port, [])
        self.kernel.reply_interfaces = wanted

    def _sync_routes_peers_forwarding(self) -> None:
        """ztgate's routes, every peer (devices, connectors) and forwarding, as the store has them."""
        routes.sync(self.config.route_table, self._routes_wanted())
        wireguard.set_peers(self.config.interface, steps.device_peers(self.identities), replace=True)
        routes.enable_forwarding(self.config.interface)
        for c in self.connectors:
            steps.connector_peer(c)

    def _rebuild(self) -> None:
        """Make the data plane equal to the store again after a change's step failed, as start
        does: a whole new build (the epoch moves: every open flow is decided again), then
        connectors, routes, peers and forwarding."""
        self._sync_connector_interfaces()
        self.kernel.stage_swap(self.identities, self.policy, self.store.generation()).apply()
        self._forget_stray_flows()
        self._sync_routes_peers_forwarding()

    def _forget_stray_flows(self) -> None:
        """Flows of addresses that are no enabled device's: a device cut while its flows could
        not be forgotten (the controller died after the commit; a step failed). Its address may
        go to another device, which must not inherit a way back."""
        enabled = [a for d in self.identities.devices if d.enabled for a in d.addresses]
        forgotten = self.kernel.forget_flows_except(enabled)
        if forgotten:
            log.info("forgot %d flows of devices that are no longer enabled", forgotten)

    def _fail_closed(self, error: BaseException) -> None:
        """The build could not be made or attached at start. A program left attached by the
        last controller goes on enforcing the last policy; an interface with no program is
        taken down, so that no packet is forwarded undecided. Then the daemon does not serve."""
        if self.kernel.attachment() is not None:
            log.error("cannot attach a new build (%s): the previous one stays attached and enforcing", error)
            return
        routes.set_link(self.config.interface, up=False)
        for c in self.connectors:
            if wireguard.exists(c.interface) and program_on(c.interface) is None:
                routes.set_link(c.interface, up=False)
        log.error("cannot attach a build (%s) and none is attached: %s is down until a gateway starts",
                  error, self.config.interface)

    def _gateway_key(self) -> str:
        """The gateway's own WireGuard key: made once, kept in the state directory (0600)."""
        path = Path(self.config.state_dir) / "gateway.key"
        if path.exists():
            return path.read_text().strip()
        private, _ = wireguard.generate_keypair()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private + "\n")
        return private

    def _routes_wanted(self) -> dict:
        """ztgate's routing table: private prefixes to their connectors, pools to the ingress."""
        wanted = {p: c.interface for c in self.connectors for p in c.routes}
        wanted.update({a.network: self.config.interface for a in self.config.gateway_addresses})
        return wanted
