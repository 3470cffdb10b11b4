"""Users, groups, devices and their pool addresses. A device or user change writes only the
sources it touches into the build in force (Kernel.stage_devices), then the device's peer."""
from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Optional

from .. import wireguard
from ..errors import InputError, ZtError
from ..files import DEVICE_NAME, parse_identities, unprintable
from ..model import Device, Identities
from . import steps
from .core import Core, Plan

GROUP_NAME_MAX = 128


class IdentityOps(Core):
    def _devices_step(self, ids: Identities, devices: list[Device]) -> list:
        """These devices' sources, as IDS has them, written into the build in force."""
        return [lambda gen: self.kernel.stage_devices(ids, self.policy, devices)] if devices else []

    def _cut_steps(self, ids: Identities, devices: list[Device], remove: bool) -> list:
        """Kernel first (the source becomes unknown: every packet drops), then the peers
        (admitting nothing, or removed)."""
        return self._devices_step(ids, [replace(d, enabled=False) for d in devices]) + [
            lambda gen, d=d: steps.peer_step(self.config, d, admit=False, remove=remove)
            for d in devices if d.public_key]

    # -----------------------------------------------------------------------------------------
    # users and groups

    def user_add(self, uid: int, email: str, groups: list[str]) -> dict:
        with self.lock:
            if self.identities.find_user(email):
                raise InputError(f"user {email!r} exists already")
            user = parse_identities({"users": [{"email": email, "groups": groups}]}, "user").users[0]
            check_groups(groups)
            ids = self.identities.adding_user(user)
            return self._commit(uid, Plan("user add", {"email": email, "groups": groups},
                                          replace(self.state, identities=ids),
                                          lambda tx: tx.add_user(user.email, dict.fromkeys(groups))))

    def user_remove(self, uid: int, email: str, with_devices: bool) -> dict:
        with self.lock:
            user = self._user(email)
            devices = self.identities.devices_of(user.key)
            if devices and not with_devices:
                raise InputError(f"user {email!r} has devices ({', '.join(d.name for d in devices)}): "
                                 "remove them first, or pass --with-devices")
            out = self._remove_user(uid, user, devices, "user remove", {"email": email})
            return dict(out, devices_removed=[d.name for d in devices])

    def _remove_user(self, uid: int, user, devices: list[Device], what: str, detail: dict, also=None) -> dict:
        """USER goes with DEVICES (all of its own): their entries and peers first, so every flow
        ends. ALSO(tx): more to write in the same transaction. The caller holds the lock."""
        ids = Identities(tuple(u for u in self.identities.users if u.key != user.key),
                         tuple(d for d in self.identities.devices if d.user != user.key))

        def write(tx) -> None:
            for d in devices:
                tx.remove_device(d.name)
            tx.remove_user(user.email)
            if also is not None:
                also(tx)
        return self._commit(uid, Plan(what, dict(detail, devices=[d.name for d in devices]),
                                      replace(self.state, identities=ids), write,
                                      self._cut_steps(ids, devices, remove=True)))

    def group_add(self, uid: int, name: str) -> dict:
        with self.lock:
            check_groups([name])
            if name in self.store.groups():
                raise InputError(f"group {name!r} exists already")
            return self._commit(uid, Plan("group add", {"name": name}, self.state, lambda tx: tx.add_group(name)))

    def group_remove(self, uid: int, name: str) -> dict:
        with self.lock:
            if name not in self.store.groups():
                raise InputError(f"no gateway group {name!r} (see `ztgate group list`)")
            members = [u for u in self.identities.users if name in u.groups]
            ids = replace(self.identities, users=tuple(
                replace(u, groups=tuple(g for g in u.groups if g != name)) for u in self.identities.users))
            touched = [d for d in ids.devices if any(d.user == u.key for u in members)]
            return self._commit(uid, Plan("group remove", {"name": name}, replace(self.state, identities=ids),
                                          lambda tx: tx.remove_group(name), self._devices_step(ids, touched)))

    def group_member(self, uid: int, group: str, email: str, present: bool) -> dict:
        with self.lock:
            user = self._user(email)
            check_groups([group])
            if present == (group in user.groups):
                return {"generation": self.store.generation(), "unchanged": True}
            groups = user.groups + (group,) if present else tuple(g for g in user.groups if g != group)
            ids = self.identities.replacing_user(user, replace(user, groups=groups))
            key = user.key
            return self._commit(uid, Plan("group member add" if present else "group member remove",
                                          {"group": group, "email": user.email}, replace(self.state, identities=ids),
                                          lambda tx: tx.set_user_groups(user.email, groups),
                                          self._devices_step(ids, ids.devices_of(key))))

    # -----------------------------------------------------------------------------------------
    # devices and their pool addresses

    def _free_offset(self) -> int:
        base = int(self.config.pool_ipv4.network_address)
        address = self.identities.first_free_ipv4(base + 2, base + self.config.pool_size)
        if address is not None:
            return address - base
        raise ZtError(f"the tunnel pool {self.config.pool_ipv4} is full")

    def _new_device(self, name: str, email: str, public_key: Optional[str]) -> tuple[Device, Optional[str]]:
        """The device to enroll, with its pool addresses, and its private key if made here."""
        if not DEVICE_NAME.match(name):
            raise InputError(f"device name {name!r} must match [a-z0-9][a-z0-9._-]{{0,62}}")
        if self.identities.find_device(name) is not None:
            raise InputError(f"device {name!r} exists already (remove it first, or pick another name)")
        user = self._user(email)
        private = None
        if public_key is None:
            private, public_key = wireguard.generate_keypair()
        else:
            public_key = wireguard.check_public_key(public_key)
            if public_key == self.public_key or self.identities.key_enrolled(public_key):
                raise InputError("that public key is already enrolled: each device has its own key pair")
        if not self.config.endpoint:
            raise InputError(f"{self.config.source}: set endpoint (HOST:PORT devices dial) to enroll devices")
        offset = self._free_offset()
        v4 = self.config.pool_ipv4.network_address + offset
        v6 = self.config.pool_ipv6.network_address + offset if self.config.pool_ipv6 else None
        return Device(name, user.key, v4, v6, public_key, True), private

    def device_add(self, uid: int, name: str, email: str, public_key: Optional[str]) -> dict:
        with self.lock:
            device, private = self._new_device(name, email, public_key)
            user = self._user(email)
            ids = self.identities.adding_device(device)
            out = self._commit(uid, Plan(
                "device add", {"name": name, "user": user.email, "public_key": device.public_key,
                               "addresses": [str(a) for a in device.addresses]},
                replace(self.state, identities=ids), lambda tx: tx.add_device(device),
                self._devices_step(ids, [device]) + [lambda gen: steps.peer_step(self.config, device, admit=True)],
                owners={name: user.key}))
            out.update(device=name, user=user.email, addresses=[str(a) for a in device.addresses],
                       public_key=device.public_key)
            if private is not None:
                out["private_key"] = private   # printed once by the CLI, never stored
                out["config"] = wireguard.client_config(
                    private, [ipaddress.ip_interface(p) for p in steps.own_prefixes(device)], self.public_key,
                    self.config.endpoint, self._client_routes(), dns=self.config.dns.resolvers)
            return out

    def _client_routes(self) -> list[str]:
        """What a device sends into its tunnel: the configured routes and the connectors'."""
        nets = list(self.config.routes) + [p for c in self.connectors for p in c.routes]
        return [str(n) for n in dict.fromkeys(nets)]

    def device_set_enabled(self, uid: int, name: str, enabled: bool) -> dict:
        with self.lock:
            device = self._device(name)
            if device.enabled == enabled:
                return {"generation": self.store.generation(), "unchanged": True}
            new = replace(device, enabled=enabled)
            ids = self.identities.replacing_device(device, new)
            if enabled:
                staged = self._devices_step(ids, [new]) + (
                    [lambda gen: steps.peer_step(self.config, new, admit=True)] if new.public_key else [])
            else:
                staged = self._cut_steps(ids, [device], remove=False)
            return self._commit(uid, Plan("device enable" if enabled else "device disable", {"name": name},
                                          replace(self.state, identities=ids),
                                          lambda tx: tx.set_device_enabled(name, enabled), staged))

    def device_remove(self, uid: int, name: str) -> dict:
        with self.lock:
            device = self._device(name)
            ids = self.identities.removing_devices([name])
            return self._commit(uid, Plan("device remove", {"name": name}, replace(self.state, identities=ids),
                                          lambda tx: tx.remove_device(name),
                                          self._cut_steps(ids, [device], remove=True)))


def check_groups(groups) -> None:
    for g in groups:
        if not isinstance(g, str) or not g or len(g) > GROUP_NAME_MAX or g != g.strip() or unprintable(g):
            raise InputError(f"group {g!r}: a group is a non-empty name of at most {GROUP_NAME_MAX} "
                             "characters without leading or trailing spaces or control characters")
