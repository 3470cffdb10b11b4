"""Sessions: users and devices from the identity provider (spec/IDENTITY.md), as the enrollment
service and SCIM ask for them, and the verbs that end sessions.

A login binds a device's key to the user the token names (keyed by issuer and subject; the
email is what rules name), sets the user's provider groups and starts a session that ends at
`session_expires`. From then on the device's source entries say session-expired (the
compiler writes them so, from the state and the time), its open flows end with the epoch as
a disabled device's do, and its WireGuard peer stays: a renewal writes the entries back and
gives access at once. The ExpiryClock (expiry.py) ends each session at its time, without
waiting for a packet or a poll. A deprovisioned (inactive) user's devices are all
session-expired, hand-made ones too, and the user may not log in until active again.

Every operation validates first (bad input: InputError, 400; a refusal: SessionRefused with
its HTTP status), then runs one Plan through the core's transaction, with an audit row.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import time
from dataclasses import replace
from typing import Any, Optional

from .. import wireguard
from ..errors import InputError, ZtError
from ..files import DEVICE_NAME, parse_identities, unprintable
from ..model import Device, Identities, User, fold
from . import admission, floors, steps
from .core import Plan
from .expiry import ExpiryClock
from .identities import IdentityOps, check_groups

log = logging.getLogger("ztgate.sessions")
MAX_SESSION_SECONDS = 400 * 86400
MAX_ID = 1024             # issuer, subject, SCIM ids: characters at most


class SessionRefused(ZtError):
    """The gateway refuses this user or device (nothing changed). `status` is the HTTP status
    the enrollment service answers: 403 a deprovisioned user or a disabled device, 404 no
    such device of that user (or no such user), 409 a name, key or email held by someone else."""

    exit_status = 2

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SessionOps(IdentityOps):
    def __init__(self, config):
        super().__init__(config)
        self.expiry = ExpiryClock(self._expire_due)

    def start(self) -> None:
        """The build made at start writes sessions already over as expired; the clock ends
        the others at their time."""
        super().start()
        for d in self.identities.devices:
            if d.session_expires is not None:
                self.expiry.add(d.session_expires)
        self.expiry.start()

    # -----------------------------------------------------------------------------------------
    # login and renewal (the enrollment service)

    def login(self, uid: int, *, issuer: str, subject: str, email: str, provider_groups: list[str], device: str,
              public_key: str, session_seconds: float, issued_at: Optional[float] = None) -> dict:
        """The token's user (made at first login) with its provider groups; the device made
        (a free tunnel address, a WireGuard peer) or, the same user, name and key again, its
        session renewed. ISSUED_AT: the token's iat (floors.py; None: the socket's caller)."""
        with self.lock:
            _check_login(issuer, subject, email, provider_groups, session_seconds)
            key = wireguard.check_public_key(public_key)
            if not isinstance(device, str) or not DEVICE_NAME.match(device):
                raise InputError(f"device name {device!r} must match [a-z0-9][a-z0-9._-]{{0,62}}")
            user = self._idp_user(issuer, subject, email, provider_groups)
            expires = time.time() + session_seconds
            old = next((d for d in self.identities.devices if d.name == device), None)
            if old is not None:
                if old.user != user.key or old.public_key != key:
                    raise SessionRefused(409, f"device name {device!r} is taken: pick another name")
                self._admit(admission.too_early(self.store.db, user, device, issued_at))
                return self._session(uid, "renewal", user, self._renewable(old, expires), created=False)
            if key == self.public_key or any(d.public_key == key for d in self.identities.devices):
                raise SessionRefused(409, "that public key is enrolled already: each device has its own key pair")
            self._admit(admission.too_early(self.store.db, user, None, issued_at),       # (the socket: no cap)
                        issued_at is not None and admission.over_cap(self.identities, user, self._max_devices))
            return self._session(uid, "login", user, self._session_device(device, user, key, expires), created=True)

    def renew(self, uid: int, *, issuer: str, subject: str, email: str, provider_groups: list[str], device: str,
              session_seconds: float, issued_at: Optional[float] = None) -> dict:
        """A fresh token of the device's user: its session starts again, its groups are the token's."""
        with self.lock:
            _check_login(issuer, subject, email, provider_groups, session_seconds)
            user = self._idp_user(issuer, subject, email, provider_groups, must_exist=True)
            old = next((d for d in self.identities.devices if d.name == device and d.user == user.key), None)
            if old is None:
                raise SessionRefused(404, f"{user.email} has no device named {device!r}")
            self._admit(admission.too_early(self.store.db, user, device, issued_at))
            return self._session(uid, "renewal", user, self._renewable(old, time.time() + session_seconds),
                                 created=False)

    def _idp_user(self, issuer: str, subject: str, email: str, groups: list[str], must_exist: bool = False) -> User:
        """The user (issuer, subject) names, with these provider groups. A user of that email
        who has no identity at the provider yet (made by hand, or by SCIM) becomes this one."""
        found = next((u for u in self.identities.users if (u.issuer, u.subject) == (issuer, subject)), None)
        if found is None:
            found = self.identities.find_user(email)
            if found is not None and found.issuer is not None:
                raise SessionRefused(409, f"user {email!r} is another identity's at the identity provider")
        elif found.key != fold(email):
            raise SessionRefused(409, f"the identity provider now names {found.email!r} {email!r}: the gateway "
                                      "keeps emails (rules name them); remove the user to enroll it again")
        if found is None and must_exist:
            raise SessionRefused(404, f"no user {email!r}: enroll a device first")
        if found is not None and not found.active:
            raise SessionRefused(403, f"user {found.email!r} is deprovisioned")
        return replace(found or User(email, ()), issuer=issuer, subject=subject,
                       provider_groups=tuple(dict.fromkeys(groups)))

    def _admit(self, *refusals) -> None:
        """Raise the first refusal (admission.py) of REFUSALS that is not None."""
        for refused in refusals:
            if refused:
                raise SessionRefused(*refused)

    @property
    def _max_devices(self):
        return getattr(self.config.identity, "max_devices", None)

    @staticmethod
    def _renewable(device: Device, expires: float) -> Device:
        if not device.enabled:
            raise SessionRefused(403, f"device {device.name!r} is disabled")
        if device.session_expires is None:          # IDENTITY.md: hand-made devices never expire
            raise SessionRefused(409, f"device {device.name!r} was enrolled by hand and has no session to renew: "
                                      "enroll under another device name, or ask an operator to remove it "
                                      f"(`ztgate device remove {device.name}`)")
        return replace(device, session_expires=expires)

    def _session_device(self, name: str, user: User, key: str, expires: float) -> Device:
        if not self.config.endpoint:
            raise InputError(f"{self.config.source}: set endpoint (HOST:PORT devices dial) to enroll devices")
        offset = self._free_offset()
        v4 = self.config.pool_ipv4.network_address + offset
        v6 = self.config.pool_ipv6.network_address + offset if self.config.pool_ipv6 else None
        return Device(name, user.key, v4, v6, key, True, expires)

    def _session(self, uid: int, what: str, user: User, device: Device, created: bool) -> dict:
        """Commit USER (its provider fields) and DEVICE (new, or its session moved on): every
        device of the user is written again (its groups may have changed), a new one's peer added."""
        ids = self.identities
        known = ids.find_user(user.email) is not None
        users = tuple(user if u.key == user.key else u for u in ids.users) + (() if known else (user,))
        devices = tuple(device if d.name == device.name else d for d in ids.devices) + ((device,) if created else ())
        ids = Identities(users, devices)

        def write(tx) -> None:
            tx.put_idp_user(user)
            if created:
                tx.add_device(device)
            else:
                tx.set_session(device.name, device.session_expires)
        staged = self._devices_step(ids, [d for d in devices if d.user == user.key])
        if created:
            staged.append(lambda gen: steps.peer_step(self.config, device, admit=True))
        addresses = [str(a) for a in device.addresses]
        out = self._commit(uid, Plan(what, {"device": device.name, "user": user.email, "issuer": user.issuer,
                                            "subject": user.subject, "groups": list(user.provider_groups),
                                            "session_expires": device.session_expires, "addresses": addresses},
                                     replace(self.state, identities=ids), write, staged,
                                     owners={device.name: user.key}))
        self.expiry.add(device.session_expires)
        config = wireguard.client_config(None, [ipaddress.ip_interface(p) for p in steps.own_prefixes(device)],
                                         self.public_key, self.config.endpoint, self._client_routes())
        return dict(out, device=device.name, user=user.email, addresses=addresses,
                    session_expires=device.session_expires, config=config, created=created)

    # -----------------------------------------------------------------------------------------
    # ending sessions: now (the verbs, deprovisioning) or at their time (the clock)

    def device_expire(self, uid: int, name: str) -> dict:
        with self.lock:
            device = self._device(name)
            if device.session_expires is None:
                raise InputError(f"device {name!r} was enrolled by hand and has no session "
                                 "(`ztgate device disable` cuts it)")
            return self._end_sessions(uid, "device expire", {"name": name}, [device], floor=("device", name))

    def user_expire(self, uid: int, email: str) -> dict:
        with self.lock:
            user = self._user(email)
            return self._end_sessions(uid, "user expire", {"email": user.email},
                                      [d for d in self.identities.devices if d.user == user.key],
                                      floor=("user", user.key))

    def _end_sessions(self, uid: int, what: str, detail: dict, devices: list[Device],
                      user: Optional[User] = None, floor: Optional[tuple[str, str]] = None) -> dict:
        """The sessions of DEVICES that are not over end now (and USER, if given, is stored as it
        is): their entries say session-expired, the epoch moves, their flows end. FLOOR (kind,
        name): tokens issued until now no longer log in there (floors.py), even when no
        session was left to end."""
        now = time.time()
        ended = {d.name: replace(d, session_expires=now) for d in devices
                 if d.session_expires is not None and d.session_expires > now}
        ids = self.identities
        if user is None and not ended:
            if floor is not None:
                floors.note_ended(self.store.db, *floor, now)
                self.store.note(uid, what, dict(detail, ended=[], logins_after=now))
            return {"generation": self.store.generation(), "unchanged": True, "ended": []}
        users = tuple(user if user is not None and u.key == user.key else u for u in ids.users)
        ids = Identities(users, tuple(ended.get(d.name, d) for d in ids.devices))
        touched = [d for d in ids.devices if d.name in ended or (user is not None and d.user == user.key)]

        def write(tx) -> None:
            if user is not None:
                tx.put_idp_user(user)
            for name in ended:
                tx.set_session(name, now)
            if floor is not None:
                floors.note_ended(tx.db, *floor, now)
        out = self._commit(uid, Plan(what, dict(detail, ended=sorted(ended)), replace(self.state, identities=ids),
                                     write, self._devices_step(ids, touched)))
        return dict(out, ended=sorted(ended))

    def _expire_due(self) -> None:
        """The clock's call: the devices whose sessions are over and whose entries in the
        build in force do not say so yet are written expired (the epoch moves with them)."""
        with self.lock:
            now = time.time()
            ids = self.identities
            over = [d for d in ids.devices if d.enabled and d.session_over(now)]
            todo = [d for d in over if d.name not in self.kernel.expired_devices(over)]
            if not todo:
                return
            self.kernel.stage_devices(ids, self.policy, todo).apply()
            late = [round(now - d.session_expires, 3) for d in todo]
            self.store.note(0, "session expiry", {"devices": [d.name for d in todo], "late_seconds": late})
            log.info("sessions over: %s", ", ".join(d.name for d in todo))

    # -----------------------------------------------------------------------------------------
    # provisioning (SCIM)

    def deprovision(self, uid: int, *, email: Optional[str] = None, scim_id: Optional[str] = None,
                    active: bool = False) -> dict:
        """ACTIVE False: every session of the user ends and its open flows are cut at once (its
        hand-made devices' too); it may not log in until it is active again."""
        with self.lock:
            user = self._provisioned(email, scim_id)
            _check_bool(active, "active")
            if user.active == active:
                return {"generation": self.store.generation(), "unchanged": True, "user": user.email}
            return self._set_active(uid, replace(user, active=active))

    def _provisioned(self, email: Optional[str], scim_id: Optional[str]) -> User:
        if (email is None) == (scim_id is None):
            raise InputError("name the user by email or by scim_id (one of them)")
        if email is not None:
            found = self.identities.find_user(email) if isinstance(email, str) else None
        else:
            found = next((u for u in self.identities.users if u.scim_id == scim_id), None)
        if found is None:
            raise SessionRefused(404, f"no user {email or scim_id!r}")
        return found

    def _set_active(self, uid: int, user: User, what: str = "") -> dict:
        """USER stored with its new `active`: deactivated, its sessions end; either way its
        devices are written again (a hand-made one's access follows the user)."""
        what = what or ("deprovision" if not user.active else "reprovision")
        devices = [d for d in self.identities.devices if d.user == user.key]
        out = self._end_sessions(uid, what, {"email": user.email, "scim_id": user.scim_id, "active": user.active},
                                 devices if not user.active else [], user=user)
        return dict(out, user=user.email, active=user.active)

    def scim_user(self, uid: int, *, scim_id: str, email: str, external_id: Optional[str], active: bool) -> dict:
        """SCIM create or replace: the user of SCIM_ID (or of EMAIL, which it then binds)."""
        with self.lock:
            _check_text(scim_id, "scim_id")
            _check_email(email)
            if external_id is not None:
                _check_text(external_id, "externalId")
            _check_bool(active, "active")
            found = next((u for u in self.identities.users if u.scim_id == scim_id), None)
            if found is not None and found.key != fold(email):
                raise SessionRefused(409, f"SCIM user {scim_id!r} is {found.email!r} here, not {email!r}: the gateway "
                                          "keeps emails (rules name them); delete the user to provision it again")
            if found is None:
                found = self.identities.find_user(email)
                if found is not None and found.scim_id is not None:
                    raise SessionRefused(409, f"user {email!r} is another SCIM user's")
                self._admit(admission.hand_made(self.identities, found))
            created = found is None
            user = replace(found or User(email, ()), scim_id=scim_id, external_id=external_id, active=active)
            if created:
                ids = replace(self.identities, users=self.identities.users + (user,))
                out = self._commit(uid, Plan("scim user", {"email": email, "scim_id": scim_id, "active": active},
                                             replace(self.state, identities=ids), lambda tx: tx.put_idp_user(user)))
            elif user == found:
                out = {"generation": self.store.generation(), "unchanged": True}
            else:
                out = self._set_active(uid, user, "scim user" if user.active == found.active else "")
            return dict(out, user=user.email, scim_id=scim_id, active=active, created=created)

    def scim_user_delete(self, uid: int, scim_id: str) -> dict:
        """The user goes, with its devices (their entries and peers first: every flow ends), and
        tokens issued until now do not enroll it again (floors.py)."""
        with self.lock:
            user = self._provisioned(None, scim_id)
            devices = [d for d in self.identities.devices if d.user == user.key]
            out = self._remove_user(uid, user, devices, "scim user delete", {"email": user.email, "scim_id": scim_id},
                                    also=lambda tx: floors.note_deleted(tx, user, time.time()))
            return dict(out, user=user.email, devices_removed=[d.name for d in devices])

    def provider_group_members(self, uid: int, group: str, emails: list[str]) -> dict:
        """SCIM Groups: GROUP's members at the provider are exactly these users (emails of no
        user here are left out, and named in `unknown`)."""
        with self.lock:
            check_groups([group])
            if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
                raise InputError("emails: a list of strings")
            wanted = {fold(e) for e in emails}
            changed = []
            for u in self.identities.users:
                if (u.key in wanted) != (group in u.provider_groups):
                    groups = u.provider_groups + (group,) if u.key in wanted else \
                        tuple(g for g in u.provider_groups if g != group)
                    changed.append(replace(u, provider_groups=groups))
            unknown = sorted(e for e in emails if self.identities.find_user(e) is None)
            if not changed:
                return {"generation": self.store.generation(), "unchanged": True, "unknown": unknown}
            new = {u.key: u for u in changed}
            ids = replace(self.identities, users=tuple(new.get(u.key, u) for u in self.identities.users))

            def write(tx) -> None:
                for u in changed:
                    tx.put_idp_user(u)
            touched = [d for d in ids.devices if d.user in new]
            out = self._commit(uid, Plan("provider group members", {"group": group, "members": sorted(wanted)},
                                         replace(self.state, identities=ids), write, self._devices_step(ids, touched)))
            return dict(out, changed=sorted(u.email for u in changed), unknown=unknown)


def kept_from_provider(old: Identities, new: Identities) -> Identities:
    """NEW (an identities file, which knows nothing of the identity provider) with what OLD
    holds from the provider kept: users' provider fields, devices' sessions (same key)."""
    users = {u.key: u for u in old.users}
    devices = {d.name: d for d in old.devices}
    return Identities(
        tuple(replace(u, **_provider_fields(users[u.key])) if u.key in users else u
              for u in new.users),
        tuple(replace(d, session_expires=devices[d.name].session_expires)
              if d.name in devices and devices[d.name].public_key == d.public_key else d for d in new.devices))


def _provider_fields(u: User) -> dict:
    return {"provider_groups": u.provider_groups, "issuer": u.issuer, "subject": u.subject, "active": u.active,
            "scim_id": u.scim_id, "external_id": u.external_id, "by_hand": u.by_hand}


def _check_login(issuer: Any, subject: Any, email: Any, groups: Any, seconds: Any) -> None:
    _check_text(issuer, "issuer")
    _check_text(subject, "subject")
    _check_email(email)
    if not isinstance(groups, (list, tuple)):
        raise InputError("provider_groups: a list of group names")
    check_groups(groups)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or not 0 < seconds <= MAX_SESSION_SECONDS:
        raise InputError(f"session_seconds {seconds!r}: a number of seconds above 0, at most {MAX_SESSION_SECONDS}")


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_ID or unprintable(value):
        raise InputError(f"{what} {value!r:.80}: a non-empty string of at most {MAX_ID} printable characters")


def _check_email(email: Any) -> None:
    if not isinstance(email, str):
        raise InputError(f"email {email!r:.80}: a string")
    parse_identities({"users": [{"email": email, "groups": []}]}, "request")


def _check_bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{what} {value!r:.80}: true or false")
