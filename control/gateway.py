"""The gateway: the store, the kernel build and the WireGuard interface, moved together.

Every operation the API offers is a method here. A change is validated first (a bad request
changes nothing), then made inside one store transaction: the kernel and the WireGuard peers
are staged before the commit (where a change can still fail) and applied after it. A
controller killed in the middle leaves the store whole (SQLite) and the kernel enforcing
what it enforced, never a change the store does not hold; start() makes kernel and peers
equal to the store again.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from dataplane.attach import attached

from . import routes, wireguard
from .config import Config
from .errors import InputError, KernelError, ZtError
from .files import (DEVICE_NAME, dump_yaml, identities_doc, parse_identities, parse_policy, parse_rule,
                    policy_doc, rule_doc)
from .kernel import DEFAULT_RULE, Kernel, Staged
from .model import Connector, Device, Identities, Policy, User
from .packets import build_raw, packet_from_fields
from .reference import identify, trace
from .store import Store

log = logging.getLogger("ztgate.gateway")
ONLINE_SECONDS = 180          # a device with a handshake this recent counts as online
GROUP_NAME_MAX = 128
CONNECTOR_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,10}\Z")   # its interface is ztc-NAME (15 at most)
KEEPALIVE = 25                # seconds: a connector keeps its tunnel (and NAT mappings) up
PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
CT_STATES = {0: "open", 1: "closing", 2: "killed"}


class Gateway:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.database)
        self.identities = self.store.identities()
        self.policy = self.store.policy()
        self.connectors = self.store.connectors()
        self.kernel = Kernel(config)
        self.lock = threading.RLock()
        self.owner: dict[str, str] = {}            # device name -> user, also of removed devices
        self.started = time.time()
        self.wg_kind = ""
        self.public_key = ""

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
                _fault("load")
                self.kernel.stage_swap(self.identities, self.policy, self.store.generation()).apply()
            except BaseException as e:
                self._fail_closed(e)
                raise
            self._forget_stray_flows()
            # routing before peers and forwarding: no device packet meets the main table first
            routes.install_rules(cfg.route_table, cfg.route_priority, cfg.interface, cfg.routes,
                                 ipv6=cfg.pool_ipv6 is not None)
            self._sync_routes_peers_forwarding()
            for warning in routes.host_warnings():
                log.warning("%s", warning)
            self._note_owners()
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
        wireguard.set_peers(self.config.interface, self._peers(self.identities), replace=True)
        routes.enable_forwarding(self.config.interface)
        for c in self.connectors:
            wireguard.set_peers(c.interface, [wireguard.Peer(c.public_key, c.routes)], replace=True)
            routes.enable_forwarding(c.interface, connector=True)

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
        forgotten = self.kernel.build.program.forget_flows_except(enabled)
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
            if wireguard.exists(c.interface) and _program_on(c.interface) is None:
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

    @staticmethod
    def _peers(identities: Identities) -> list:
        """Every enrolled device's peer; a disabled device's admits no address (see _peer_step)."""
        return [wireguard.Peer(d.public_key, tuple(_own_prefixes(d)) if d.enabled else ())
                for d in identities.devices if d.public_key]

    def _routes_wanted(self) -> dict:
        """ztgate's routing table: private prefixes to their connectors, pools to the ingress."""
        wanted = {p: c.interface for c in self.connectors for p in c.routes}
        wanted.update({a.network: self.config.interface for a in self.config.gateway_addresses})
        return wanted

    def _client_routes(self) -> list[str]:
        """What a device sends into its tunnel: the configured routes and the connectors'."""
        nets = list(self.config.routes) + [p for c in self.connectors for p in c.routes]
        return [str(n) for n in dict.fromkeys(nets)]

    def _note_owners(self) -> None:
        for d in self.identities.devices:
            self.owner[d.name] = d.user

    # -----------------------------------------------------------------------------------------
    # the transaction every change goes through

    @contextmanager
    def _change(self, uid: int, what: str, detail: dict) -> Iterator[tuple[Any, list]]:
        """Yields (store change, later). The caller writes the store and stages kernel and
        WireGuard steps in `later`; staging is where a change can still fail, and then the
        store rolls back and the staged steps are discarded: nothing moved. After the commit
        the steps are applied in order (kernel before peers when access is taken away)."""
        later: list[Staged] = []
        try:
            with self.store.change(uid, what, detail) as tx:
                yield tx, later
                _pause("before-commit")
        except BaseException:
            for step in later:
                step.discard()
            raise
        _pause("after-commit")
        failed = []
        for step in later:          # every step is tried: one failing must not skip a revocation
            try:
                _fault("apply", step)
                step.apply()
            except Exception as e:
                log.exception("applying generation %d (%s)", self.store.generation(), what)
                failed.append(str(e))
        if failed:
            # The store holds the change: so does the controller's view of it from here on, and
            # the data plane is rebuilt from it whole (a step's failure may have left it between).
            self.identities, self.policy = self.store.identities(), self.store.policy()
            self.connectors = self.store.connectors()
            try:
                self._rebuild()
            except Exception as e:
                log.exception("rebuilding the data plane from generation %d", self.store.generation())
                raise KernelError(f"generation {self.store.generation()} ({what}) is stored, but the data plane "
                                  f"could not follow: {'; '.join(failed)}; nor could a whole rebuild: {e}. "
                                  "Restart the gateway to make it equal to the store.") from e
            log.warning("generation %d (%s): a step failed (%s); the data plane was rebuilt whole from the store",
                        self.store.generation(), what, "; ".join(failed))
        log.info("generation %d: %s %s", self.store.generation(), what, detail)

    def _peer_step(self, device: Device, admit: bool, remove: bool = False) -> Staged:
        """A device's peer, after the commit: admitting the device's addresses; or admitting
        none (a disabled device: WireGuard takes nothing from it and routes nothing to it, while
        its session lives on, so that `device enable` works at once instead of after the ~15 s
        the device's WireGuard would take to notice a lost session); or removed (a removed
        device: its key may not even handshake any more)."""
        iface, key = self.config.interface, device.public_key
        if remove:
            return Staged(lambda: wireguard.remove_peer(iface, key), lambda: None)
        prefixes = _own_prefixes(device) if admit else []
        return Staged(lambda: wireguard.add_peer(iface, key, prefixes), lambda: None)

    # -----------------------------------------------------------------------------------------
    # reading

    def status(self) -> dict:
        with self.lock:
            att = self.kernel.attachment()
            build = self.kernel.build
            peers = self._peer_states()
            now = time.time()
            online = sum(1 for p in peers.values() if p.last_handshake and now - p.last_handshake < ONLINE_SECONDS)
            pins = sorted(str(p.relative_to(self.config.bpf_pin_dir))
                          for p in Path(self.config.bpf_pin_dir).rglob("*") if not p.is_dir()) \
                if Path(self.config.bpf_pin_dir).exists() else []
            return {
                "interface": self.config.interface, "wireguard": self.wg_kind, "public_key": self.public_key,
                "listen_port": self.config.listen_port, "endpoint": self.config.endpoint,
                "addresses": [str(a) for a in self.config.gateway_addresses],
                "program_id": att[0] if att else None, "attach_mode": att[1] if att else None,
                "build": build.number if build else None, "pin_dir": str(self.config.bpf_pin_dir), "pinned": pins,
                "generation": self.store.generation(),
                "users": len(self.identities.users), "groups": len(self.store.groups()),
                "devices": len(self.identities.devices),
                "connectors": [{"name": c.name, "interface": c.interface, "routes": [str(r) for r in c.routes],
                                "reply_program": _program_on(c.interface)} for c in self.connectors],
                "warnings": routes.host_warnings(),
                "devices_enabled": sum(d.enabled for d in self.identities.devices),
                "devices_online": online, "rules": len(self.policy.rules),
                "rules_enabled": len(self.policy.ordered_rules),
                "default_action": self.policy.default_action,
                "uptime_seconds": round(now - self.started, 1),
                "tables": build.tables.stats if build else {},
            }

    def _peer_states(self) -> dict:
        try:
            return {p.public_key: p for p in wireguard.show(self.config.interface).peers}
        except ZtError:
            return {}

    def policy_show(self) -> dict:
        with self.lock:
            return {"generation": self.store.generation(), "policy": dump_yaml(policy_doc(self.policy))}

    def identities_show(self) -> dict:
        with self.lock:
            return {"generation": self.store.generation(), "identities": dump_yaml(identities_doc(self.identities))}

    def rule_list(self) -> list[dict]:
        with self.lock:
            hits = self.kernel.rule_hits()
            out = []
            for r in sorted(self.policy.rules, key=lambda r: r.precedence):
                packets, nbytes = hits.get(r.name, (0, 0))
                out.append(dict(rule_doc(r), enabled=r.enabled, packets=packets, bytes=nbytes))
            return out

    def user_list(self) -> list[dict]:
        with self.lock:
            count: dict[str, int] = {}
            for d in self.identities.devices:
                count[d.user] = count.get(d.user, 0) + 1
            return [{"email": u.email, "groups": sorted(self.policy.groups_of(u)), "devices": count.get(u.key, 0)}
                    for u in self.identities.users]

    def group_list(self) -> list[dict]:
        with self.lock:
            out = [{"name": g, "source": "gateway", "members": m} for g, m in self.store.groups().items()]
            out += [{"name": g, "source": "policy", "members": list(m)} for g, m in self.policy.groups.items()]
            return sorted(out, key=lambda g: (g["name"], g["source"]))

    def device_list(self) -> list[dict]:
        with self.lock:
            peers = self._peer_states()
            created = self.store.created()
            out = []
            for d in self.identities.devices:
                p = peers.get(d.public_key) if d.public_key else None
                out.append({
                    "name": d.name, "user": d.user, "enabled": d.enabled,
                    "addresses": [str(a) for a in d.addresses], "public_key": d.public_key,
                    "created": created.get(d.name), "endpoint": p.endpoint if p else None,
                    "last_handshake": p.last_handshake if p and p.last_handshake else None,
                    "rx_bytes": p.rx_bytes if p else 0, "tx_bytes": p.tx_bytes if p else 0,
                })
            return out

    def audit(self, limit: int) -> list[dict]:
        with self.lock:
            return self.store.audit(limit)

    def trace(self, packet: dict) -> dict:
        """One packet through the attached program (BPF_PROG_TEST_RUN) and the reference:
        the kernel's own verdict and rule, and why every rule before it did not match."""
        with self.lock:
            fields = dict(packet)
            user = fields.pop("user", None)
            if user is not None:
                fields["src"] = self._source_of(user, fields.get("dst"))
            pkt = packet_from_fields(fields, "trace")
            decision, misses = trace(self.policy, self.identities, pkt)
            build = self.kernel.build
            with build.program.on_one_cpu() as cpu:
                r = build.program.run(build_raw(pkt), cpu=cpu, dry=True)   # no counter, event or flow
            who = identify(self.policy, self.identities, pkt.src)
            return {
                "packet": {"src": str(pkt.src), "dst": str(pkt.dst), "proto": pkt.protocol_name,
                           "proto_number": pkt.proto, "sport": pkt.sport, "dport": pkt.dport},
                "identity": {"device": who.device.name, "user": who.email, "groups": sorted(who.groups)} if who else None,
                "kernel": {"verdict": r.verdict.label, "reason": r.reason.label,
                           "rule": build.tables.rule_names[r.rule - 1] if r.rule else None, "build": build.number},
                "reference": decision.as_json(),
                "tried": [{"rule": rl.name, "precedence": rl.precedence, "action": rl.action, "why_not": why}
                          for rl, why in misses],
            }

    def _source_of(self, email: Any, dst: Any) -> str:
        if not isinstance(email, str):
            raise InputError("trace: user must be an email")
        version = 6 if isinstance(dst, str) and ":" in dst else 4
        for d in self.identities.devices:
            if d.user == email.lower() and d.enabled:
                for a in d.addresses:
                    if a.version == version:
                        return str(a)
        raise InputError(f"trace: {email} has no enabled device with an IPv{version} tunnel address")

    # -----------------------------------------------------------------------------------------
    # policy as a whole

    def policy_apply(self, uid: int, policy_text: str, policy_name: str, identities_text: Optional[str],
                     identities_name: Optional[str], dry_run: bool) -> dict:
        policy = parse_policy(_yaml(policy_text, policy_name), policy_name)
        identities = None
        if identities_text is not None:
            identities = parse_identities(_yaml(identities_text, identities_name), identities_name)
            self._check_pools(identities, identities_name)
        with self.lock:
            changes = _policy_diff(self.policy, policy)
            if identities is not None:
                changes += _identities_diff(self.identities, identities)
            if dry_run or not changes:
                return {"changes": changes, "applied": False, "generation": self.store.generation()}
            new_ids = identities if identities is not None else self.identities
            with self._change(uid, "policy apply", {"policy": policy_name, "identities": identities_name,
                                                    "changes": len(changes)}) as (tx, later):
                tx.replace_policy(policy)
                if identities is not None:
                    tx.replace_identities(identities)
                later.append(self.kernel.stage_swap(new_ids, policy, tx.generation))
                if identities is not None:
                    peers = self._peers(identities)
                    later.append(Staged(lambda: wireguard.set_peers(self.config.interface, peers, replace=True),
                                        lambda: None))
            self.policy, self.identities = policy, new_ids
            self._note_owners()
            return {"changes": changes, "applied": True, "generation": self.store.generation()}

    def _check_pools(self, identities: Identities, source: str) -> None:
        """Tunnel addresses must not be the gateway's own."""
        own = {a.ip for a in self.config.gateway_addresses}
        for d in identities.devices:
            for a in d.addresses:
                if a in own:
                    raise InputError(f"{source}: device {d.name!r}: {a} is the gateway's own tunnel address")

    # -----------------------------------------------------------------------------------------
    # rules

    def _rules_changed(self, uid: int, what: str, detail: dict, rules: list) -> dict:
        """Validate the whole new rule list as a policy file would be, then swap it in."""
        doc = dict(policy_doc(self.policy), rules=[rule_doc(r) for r in rules])
        policy = parse_policy(doc, "request")
        with self._change(uid, what, detail) as (tx, later):
            tx.replace_policy(policy)
            later.append(self.kernel.stage_swap(self.identities, policy, tx.generation))
        self.policy = policy
        return {"generation": self.store.generation()}

    def _rule(self, name: Any) -> Any:
        for r in self.policy.rules:
            if r.name == name:
                return r
        raise InputError(f"no rule named {name!r} (see `ztgate rule list`)")

    def rule_add(self, uid: int, rule: dict) -> dict:
        with self.lock:
            if isinstance(rule, dict) and rule.get("precedence") is None:
                last = max((r.precedence for r in self.policy.rules), default=0)
                rule = dict(rule, precedence=(last // 10 + 1) * 10)
            new = parse_rule(rule, "rule")
            for r in self.policy.rules:
                if r.name == new.name:
                    raise InputError(f"rule {new.name!r} exists already (remove it first, or pick another name)")
                if r.precedence == new.precedence:
                    raise InputError(f"rule {new.name!r}: precedence {new.precedence} is taken by rule {r.name!r}")
            out = self._rules_changed(uid, "rule add", rule_doc(new), list(self.policy.rules) + [new])
            return dict(out, rule=rule_doc(new))

    def rule_remove(self, uid: int, name: str) -> dict:
        with self.lock:
            self._rule(name)
            return self._rules_changed(uid, "rule remove", {"name": name},
                                       [r for r in self.policy.rules if r.name != name])

    def rule_set_enabled(self, uid: int, name: str, enabled: bool) -> dict:
        with self.lock:
            if self._rule(name).enabled == enabled:
                return {"generation": self.store.generation(), "unchanged": True}
            return self._rules_changed(uid, "rule enable" if enabled else "rule disable", {"name": name},
                                       [replace(r, enabled=enabled) if r.name == name else r for r in self.policy.rules])

    def rule_move(self, uid: int, name: str, precedence: Optional[int], before: Optional[str],
                  after: Optional[str]) -> dict:
        with self.lock:
            rule = self._rule(name)
            if sum(x is not None for x in (precedence, before, after)) != 1:
                raise InputError("rule move: give exactly one of precedence, before or after")
            others = sorted((r for r in self.policy.rules if r.name != name), key=lambda r: r.precedence)
            if precedence is not None:
                if precedence < 1:
                    raise InputError(f"rule move: precedence must be 1 or more, got {precedence}")
                clash = [r.name for r in others if r.precedence == precedence]
                if clash:
                    raise InputError(f"rule move: precedence {precedence} is taken by rule {clash[0]!r}")
                rules = others + [replace(rule, precedence=precedence)]
            else:
                anchor = before if before is not None else after
                names = [r.name for r in others]
                if anchor not in names:
                    raise InputError(f"rule move: no other rule named {anchor!r}")
                at = names.index(anchor) + (1 if after is not None else 0)
                order = others[:at] + [rule] + others[at:]
                lo = order[at - 1].precedence if at > 0 else 0
                hi = order[at + 1].precedence if at + 1 < len(order) else lo + 20
                if hi - lo >= 2:
                    rules = others + [replace(rule, precedence=(lo + hi) // 2)]
                else:   # no room between the neighbours: renumber everything by tens, in order
                    rules = [replace(r, precedence=10 * (i + 1)) for i, r in enumerate(order)]
            return self._rules_changed(uid, "rule move", {"name": name, "precedence": precedence,
                                                          "before": before, "after": after}, rules)

    # -----------------------------------------------------------------------------------------
    # users and groups

    def _user(self, email: Any) -> User:
        try:
            return self.identities.user(email)
        except (KeyError, AttributeError):
            raise InputError(f"no user {email!r} (see `ztgate user list`)") from None

    def _stage_devices(self, later: list, identities: Identities, devices: list[Device]) -> None:
        if devices:
            later.append(self.kernel.stage_devices(identities, self.policy, devices))

    def user_add(self, uid: int, email: str, groups: list[str]) -> dict:
        with self.lock:
            if self.identities._users_by_key.get(email.lower()):
                raise InputError(f"user {email!r} exists already")
            user = parse_identities({"users": [{"email": email, "groups": groups}]}, "user").users[0]
            _check_groups(groups)
            with self._change(uid, "user add", {"email": email, "groups": groups}) as (tx, later):
                tx.add_user(user.email, dict.fromkeys(groups))
            self.identities = replace(self.identities, users=self.identities.users + (user,))
            return {"generation": self.store.generation()}

    def user_remove(self, uid: int, email: str, with_devices: bool) -> dict:
        with self.lock:
            user = self._user(email)
            devices = [d for d in self.identities.devices if d.user == user.key]
            if devices and not with_devices:
                raise InputError(f"user {email!r} has devices ({', '.join(d.name for d in devices)}): "
                                 "remove them first, or pass --with-devices")
            ids = Identities(tuple(u for u in self.identities.users if u.key != user.key),
                             tuple(d for d in self.identities.devices if d.user != user.key))
            with self._change(uid, "user remove", {"email": email, "devices": [d.name for d in devices]}) as (tx, later):
                for d in devices:
                    tx.remove_device(d.name)
                tx.remove_user(user.email)
                self._cut_devices(later, ids, devices, remove=True)
            self.identities = ids
            return {"generation": self.store.generation(), "devices_removed": [d.name for d in devices]}

    def _set_groups(self, uid: int, what: str, detail: dict, user: User, groups: tuple) -> dict:
        ids = replace(self.identities, users=tuple(replace(u, groups=groups) if u.key == user.key else u
                                                   for u in self.identities.users))
        with self._change(uid, what, detail) as (tx, later):
            tx.set_user_groups(user.email, groups)
            self._stage_devices(later, ids, [d for d in ids.devices if d.user == user.key])
        self.identities = ids
        return {"generation": self.store.generation()}

    def group_add(self, uid: int, name: str) -> dict:
        with self.lock:
            _check_groups([name])
            if name in self.store.groups():
                raise InputError(f"group {name!r} exists already")
            with self._change(uid, "group add", {"name": name}) as (tx, later):
                tx.add_group(name)
            return {"generation": self.store.generation()}

    def group_remove(self, uid: int, name: str) -> dict:
        with self.lock:
            if name not in self.store.groups():
                raise InputError(f"no gateway group {name!r} (see `ztgate group list`)")
            members = [u for u in self.identities.users if name in u.groups]
            ids = replace(self.identities, users=tuple(
                replace(u, groups=tuple(g for g in u.groups if g != name)) for u in self.identities.users))
            touched = [d for d in ids.devices if any(d.user == u.key for u in members)]
            with self._change(uid, "group remove", {"name": name}) as (tx, later):
                tx.remove_group(name)
                self._stage_devices(later, ids, touched)
            self.identities = ids
            return {"generation": self.store.generation()}

    def group_member(self, uid: int, group: str, email: str, present: bool) -> dict:
        with self.lock:
            user = self._user(email)
            _check_groups([group])
            if present == (group in user.groups):
                return {"generation": self.store.generation(), "unchanged": True}
            groups = user.groups + (group,) if present else tuple(g for g in user.groups if g != group)
            return self._set_groups(uid, "group member add" if present else "group member remove",
                                    {"group": group, "email": user.email}, user, groups)

    # -----------------------------------------------------------------------------------------
    # devices

    def _device(self, name: Any) -> Device:
        for d in self.identities.devices:
            if d.name == name:
                return d
        raise InputError(f"no device named {name!r} (see `ztgate device list`)")

    def _free_offset(self) -> int:
        used = {int(a) - int(self.config.pool_ipv4.network_address)
                for d in self.identities.devices for a in d.addresses if a.version == 4}
        for offset in range(2, self.config.pool_size):
            if offset not in used:
                return offset
        raise ZtError(f"the tunnel pool {self.config.pool_ipv4} is full")

    def device_add(self, uid: int, name: str, email: str, public_key: Optional[str]) -> dict:
        with self.lock:
            if not DEVICE_NAME.match(name):
                raise InputError(f"device name {name!r} must match [a-z0-9][a-z0-9._-]{{0,62}}")
            if any(d.name == name for d in self.identities.devices):
                raise InputError(f"device {name!r} exists already (remove it first, or pick another name)")
            user = self._user(email)
            private = None
            if public_key is None:
                private, public_key = wireguard.generate_keypair()
            else:
                public_key = wireguard.check_public_key(public_key)
                if public_key == self.public_key or any(d.public_key == public_key for d in self.identities.devices):
                    raise InputError("that public key is already enrolled: each device has its own key pair")
            if not self.config.endpoint:
                raise InputError(f"{self.config.source}: set endpoint (HOST:PORT devices dial) to enroll devices")
            offset = self._free_offset()
            v4 = self.config.pool_ipv4.network_address + offset
            v6 = self.config.pool_ipv6.network_address + offset if self.config.pool_ipv6 else None
            device = Device(name, user.key, v4, v6, public_key, True)
            ids = replace(self.identities, devices=self.identities.devices + (device,))
            with self._change(uid, "device add", {"name": name, "user": user.email, "public_key": public_key,
                                                  "addresses": [str(a) for a in device.addresses]}) as (tx, later):
                tx.add_device(device)
                self._stage_devices(later, ids, [device])
                later.append(self._peer_step(device, admit=True))
            self.identities = ids
            self.owner[name] = user.key
            out = {"generation": self.store.generation(), "device": name, "user": user.email,
                   "addresses": [str(a) for a in device.addresses], "public_key": public_key}
            if private is not None:
                out["private_key"] = private   # printed once by the CLI, never stored
                out["config"] = wireguard.client_config(
                    private, [ipaddress.ip_interface(p) for p in _own_prefixes(device)], self.public_key,
                    self.config.endpoint, self._client_routes())
            return out

    def _cut_devices(self, later: list, ids: Identities, devices: list[Device], remove: bool) -> None:
        """Kernel first (the source becomes unknown: every packet drops), then the peers
        (admitting nothing, or removed)."""
        self._stage_devices(later, ids, [replace(d, enabled=False) for d in devices])
        later += [self._peer_step(d, admit=False, remove=remove) for d in devices if d.public_key]

    def device_set_enabled(self, uid: int, name: str, enabled: bool) -> dict:
        with self.lock:
            device = self._device(name)
            if device.enabled == enabled:
                return {"generation": self.store.generation(), "unchanged": True}
            new = replace(device, enabled=enabled)
            ids = replace(self.identities, devices=tuple(new if d.name == name else d for d in self.identities.devices))
            with self._change(uid, "device enable" if enabled else "device disable", {"name": name}) as (tx, later):
                tx.set_device_enabled(name, enabled)
                if enabled:
                    self._stage_devices(later, ids, [new])
                    if new.public_key:
                        later.append(self._peer_step(new, admit=True))
                else:
                    self._cut_devices(later, ids, [device], remove=False)
            self.identities = ids
            return {"generation": self.store.generation()}

    def device_remove(self, uid: int, name: str) -> dict:
        with self.lock:
            device = self._device(name)
            ids = replace(self.identities, devices=tuple(d for d in self.identities.devices if d.name != name))
            with self._change(uid, "device remove", {"name": name}) as (tx, later):
                tx.remove_device(name)
                self._cut_devices(later, ids, [device], remove=True)
            self.identities = ids
            return {"generation": self.store.generation()}

    # -----------------------------------------------------------------------------------------
    # conntrack

    def flows(self, user: Optional[str], device: Optional[str], limit: int) -> list[dict]:
        """Live tracked flows, newest first: who, what, which rule, age, traffic both ways."""
        with self.lock:
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            rows = []
            for f, state, d in self._live_flows(user, device, now):
                proto = PROTO_NAMES.get(f["proto"], str(f["proto"]))
                rows.append({
                    "proto": proto, "src": str(f["src"]), "dst": str(f["dst"]),
                    "sport": f["sport"], "dport": f["dport"],   # an ICMP echo: its id in sport
                    "user": d.user if d else None, "device": d.name if d else None,
                    "rule": (self.kernel.rule_name(f["build"], f["rule"]) if f["rule"] else DEFAULT_RULE),
                    "state": state, "age_s": round(max(0, now - f["created_ns"]) / 1e9, 1),
                    "idle_s": round(max(0, now - f["seen_ns"]) / 1e9, 1),
                    "packets": f["packets"], "bytes": f["bytes"],
                    "reply_packets": f["reply_packets"], "reply_bytes": f["reply_bytes"]})
            rows.sort(key=lambda r: r["age_s"])
            return rows[:limit]

    def _live_flows(self, user: Optional[str], device: Optional[str], now: int) -> Iterator[tuple]:
        """(flow as Program.flows() has it, state name, owning device or None) of the flows not
        yet expired, of this user's or device's when given."""
        timeouts = dict(self.config.conntrack)
        owner = {a: d for d in self.identities.devices for a in d.addresses}
        for f in self.kernel.build.program.flows():
            proto = PROTO_NAMES.get(f["proto"], str(f["proto"]))
            state = CT_STATES.get(f["state"], "?")
            timeout = timeouts["tcp_closing" if state == "closing" else proto if proto in timeouts else "icmp"]
            if now >= f["seen_ns"] + timeout * 10**9:
                continue                  # expired: no longer honoured, not yet evicted
            d = owner.get(f["src"])
            if (user and (d is None or d.user != user.lower())) or (device and (d is None or d.name != device)):
                continue
            yield f, state, d

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
                     for f, state, _ in self._live_flows(user, device, now) if state != "killed"]
            killed = self.kernel.build.program.kill_flows(flows)
            detail = {k: v for k, v in (("user", user), ("device", device)) if v}
            self.store.note(uid, "flow kill", {**detail, "flows": killed})
            log.info("%d flows killed by uid %d: %s", killed, uid, detail)
            return {"generation": self.store.generation(), "killed": killed}

    def flows_kill(self, uid: int, proto: str, src: str, sport: int, dst: str, dport: int) -> dict:
        """End one flow: its packets drop both ways until it times out or its device opens the
        tuple again with a SYN (a new connection, decided by the policy)."""
        with self.lock:
            number = {v: k for k, v in PROTO_NAMES.items()}.get(proto)
            try:
                s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
            except ValueError:
                raise InputError(f"flows kill: {src!r} and {dst!r} must be addresses, as `ztgate flows` prints "
                                 "them") from None
            if number is None or s.version != d.version:
                raise InputError(f"flows kill: protocol {proto!r} (tcp, udp or icmp) and two addresses of one "
                                 "IP version")
            if number == 1 and s.version == 6:
                number = 58
            for port in (sport, dport):
                if not 0 <= port <= 65535:
                    raise InputError(f"flows kill: port {port} is outside 0-65535")
            if not self.kernel.build.program.kill_flow(s.version, number, s, d, sport, dport):
                raise InputError(f"no tracked {proto} flow {src}:{sport} -> {dst}:{dport} (see `ztgate flows`)")
            self.store.note(uid, "flow kill", {"proto": proto, "src": f"{src}:{sport}", "dst": f"{dst}:{dport}"})
            log.info("flow killed by uid %d: %s %s:%d -> %s:%d", uid, proto, src, sport, dst, dport)
            return {"generation": self.store.generation(), "killed": True}

    # -----------------------------------------------------------------------------------------
    # connectors and routes

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

    def connector_add(self, uid: int, name: str, listen_port: Optional[int]) -> dict:
        with self.lock:
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
                listen_port = next(p for p in range(self.config.listen_port + 1, 65536) if p not in used)
            elif listen_port in used or not 1 <= listen_port <= 65535:
                raise InputError(f"port {listen_port} is taken or out of range: the gateway listens on "
                                 f"{', '.join(map(str, sorted(used)))}")
            gateway_private, _ = wireguard.generate_keypair()
            connector_private, connector_public = wireguard.generate_keypair()
            c = Connector(name, f"ztc-{name}", listen_port, gateway_private, connector_public)
            with self._change(uid, "connector add", {"name": name, "interface": c.interface,
                                                     "listen_port": listen_port}) as (tx, later):
                tx.add_connector(c)
                later.append(self._stage_connector(c))
            self.connectors = self.store.connectors()
            host = self.config.endpoint.rpartition(":")[0]
            return {"generation": self.store.generation(), "connector": name, "interface": c.interface,
                    "listen_port": listen_port,
                    "config": connector_config(name, connector_private, wireguard.public_key_of(gateway_private),
                                               f"{host}:{listen_port}",
                                               [str(a.network) for a in self.config.gateway_addresses])}

    def _stage_connector(self, c: Connector) -> Staged:
        """Made before the commit (the port may be taken, the program may not attach): the
        interface, with the connector-side program on it before it has a peer. Applied: the
        peer, and forwarding of what the program lets through."""
        wireguard.ensure_interface(c.interface, c.private_key, c.listen_port, [])
        try:
            self.kernel.attach_reply(c.interface)
        except BaseException:
            wireguard.delete_interface(c.interface)
            raise

        def apply() -> None:
            wireguard.set_peers(c.interface, [wireguard.Peer(c.public_key, c.routes)], replace=True)
            routes.enable_forwarding(c.interface, connector=True)

        def discard() -> None:
            self.kernel.detach_reply(c.interface)
            wireguard.delete_interface(c.interface)
        return Staged(apply, discard)

    def connector_remove(self, uid: int, name: str) -> dict:
        with self.lock:
            c = self._connector(name)
            if c.routes:
                raise InputError(f"connector {name!r} serves {', '.join(map(str, c.routes))}: remove those routes "
                                 "first (ztgate route remove PREFIX)")

            def apply() -> None:
                self.kernel.detach_reply(c.interface)
                wireguard.delete_interface(c.interface)
            with self._change(uid, "connector remove", {"name": name}) as (tx, later):
                tx.remove_connector(name)
                later.append(Staged(apply, lambda: None))
            self.connectors = self.store.connectors()
            return {"generation": self.store.generation()}

    def route_list(self) -> list[dict]:
        with self.lock:
            installed = routes.routes(self.config.route_table)
            return [{"prefix": str(p), "connector": c.name, "interface": c.interface,
                     "installed": installed.get(p) == c.interface}
                    for c in self.connectors for p in c.routes]

    def route_add(self, uid: int, prefix: str, connector: str) -> dict:
        with self.lock:
            try:
                net = ipaddress.ip_network(prefix, strict=True)
            except ValueError:
                raise InputError(f"{prefix!r} is not a prefix like 10.20.0.0/16 (with the host bits zero)") from None
            c = self._connector(connector)
            _check_private_prefix(net, self.config.endpoint)
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
            new = replace(c, routes=c.routes + (net,))
            with self._change(uid, "route add", {"prefix": str(net), "connector": c.name}) as (tx, later):
                tx.add_route(net, c.name)
                later.append(Staged(lambda: self._route_step(new, net, True), lambda: None))
            self.connectors = self.store.connectors()
            return {"generation": self.store.generation()}

    def route_remove(self, uid: int, prefix: str) -> dict:
        with self.lock:
            try:
                net = ipaddress.ip_network(prefix, strict=True)
            except ValueError:
                raise InputError(f"{prefix!r} is not a prefix like 10.20.0.0/16 (with the host bits zero)") from None
            c = next((x for x in self.connectors if net in x.routes), None)
            if c is None:
                raise InputError(f"no route for {net} (see `ztgate route list`)")
            new = replace(c, routes=tuple(p for p in c.routes if p != net))
            with self._change(uid, "route remove", {"prefix": str(net), "connector": c.name}) as (tx, later):
                tx.remove_route(net)
                later.append(Staged(lambda: self._route_step(new, net, False), lambda: None))
            self.connectors = self.store.connectors()
            return {"generation": self.store.generation()}

    def _route_step(self, c: Connector, net, add: bool) -> None:
        """The connector's peer admits exactly its routes (what it may send from, and what is
        sent to it); the route goes in after the peer admits it and out before it stops."""
        peer = [wireguard.Peer(c.public_key, c.routes)]
        if add:
            wireguard.set_peers(c.interface, peer, replace=True)
            routes.set_route(self.config.route_table, net, c.interface)
        else:
            routes.remove_route(self.config.route_table, net)
            wireguard.set_peers(c.interface, peer, replace=True)


# ---------------------------------------------------------------------------------------------

def connector_config(name: str, private_key: str, gateway_public_key: str, endpoint: str, device_networks: list) -> str:
    """What `ztgate connector run` reads, inside the private network."""
    doc = {"name": name, "interface": f"ztr-{name}", "private_key": private_key,
           "gateway_public_key": gateway_public_key, "gateway_endpoint": endpoint,
           "device_networks": device_networks, "keepalive": KEEPALIVE}
    return (f"# ztgate connector {name!r}: run it inside the private network with\n"
            f"#   ztgate connector run THIS-FILE [--lan IFACE]\n"
            "# It dials out to the gateway (no inbound port to open). The private key is printed once\n"
            "# and not kept by the gateway: keep this file like a password.\n" + yaml.safe_dump(doc, sort_keys=False))


def _check_private_prefix(net, endpoint: Optional[str]) -> None:
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


def _program_on(ifname: str) -> Optional[int]:
    """The id of the XDP program on IFNAME; None if there is none, or no such interface."""
    try:
        found = attached(ifname)
    except ZtError:
        return None
    return found[0] if found else None


def _own_prefixes(d: Device) -> list[str]:
    """A device's peer admits only its own addresses."""
    return [f"{a}/{a.max_prefixlen}" for a in d.addresses]


def _check_groups(groups) -> None:
    for g in groups:
        if not isinstance(g, str) or not g or len(g) > GROUP_NAME_MAX or g != g.strip():
            raise InputError(f"group {g!r}: a group is a non-empty name of at most {GROUP_NAME_MAX} "
                             "characters without leading or trailing spaces")


def _yaml(text: Any, name: Any) -> Any:
    if not isinstance(text, str):
        raise InputError(f"{name}: the file's text must be a string")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{name}: not valid YAML: {e}") from None


def _policy_diff(old: Policy, new: Policy) -> list[str]:
    out = []
    if old.default_action != new.default_action:
        out.append(f"~ default_action {old.default_action} -> {new.default_action}")
    for g in sorted(set(old.groups) | set(new.groups)):
        a, b = old.groups.get(g), new.groups.get(g)
        if a != b:
            out.append(f"+ group {g}" if a is None else f"- group {g}" if b is None else
                       f"~ group {g}: members {sorted(a)} -> {sorted(b)}")
    before = {r.name: rule_doc(r) for r in old.rules}
    after = {r.name: rule_doc(r) for r in new.rules}
    for r in sorted(new.rules, key=lambda r: r.precedence):
        if r.name not in before:
            out.append(f"+ rule {r.name} (precedence {r.precedence}, {r.action})")
        elif before[r.name] != after[r.name]:
            keys = [k for k in dict.fromkeys(list(before[r.name]) + list(after[r.name]))
                    if before[r.name].get(k) != after[r.name].get(k)]
            out.append(f"~ rule {r.name}: " + "; ".join(
                f"{k} {before[r.name].get(k, '-')} -> {after[r.name].get(k, '-')}" for k in keys))
    out += [f"- rule {name}" for name in before if name not in after]
    return out


def _identities_diff(old: Identities, new: Identities) -> list[str]:
    out = []
    ou, nu = {u.key: u for u in old.users}, {u.key: u for u in new.users}
    out += [f"+ user {nu[k].email}" for k in nu if k not in ou]
    out += [f"~ user {nu[k].email}: groups {sorted(ou[k].groups)} -> {sorted(nu[k].groups)}"
            for k in nu if k in ou and sorted(ou[k].groups) != sorted(nu[k].groups)]
    out += [f"- user {ou[k].email}" for k in ou if k not in nu]
    od, nd = {d.name: d for d in old.devices}, {d.name: d for d in new.devices}
    out += [f"+ device {k} ({nd[k].user}, {', '.join(map(str, nd[k].addresses))})" for k in nd if k not in od]
    out += [f"~ device {k}" for k in nd if k in od and nd[k] != od[k]]
    out += [f"- device {k}" for k in od if k not in nd]
    return out


def _fault(stage: str, step: Optional[Staged] = None) -> None:
    """Fault injection for the fail-closed tests: ZTGATE_FAULT=STAGE fails the controller here
    (load: the build at start; apply: every step of a change after its commit, discarded)."""
    if os.environ.get("ZTGATE_FAULT") == stage:
        if step is not None:
            step.discard()
        raise KernelError(f"injected fault at {stage} (ZTGATE_FAULT)")


def _pause(stage: str) -> None:
    """Fault injection for the crash tests: ZTGATE_PAUSE_AT=STAGE stops the controller here
    (it says so on stderr) until it is killed."""
    if os.environ.get("ZTGATE_PAUSE_AT") == stage:
        import sys
        print(f"ztgate: paused at {stage}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
