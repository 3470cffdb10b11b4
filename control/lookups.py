"""The lookups a change needs in 100k devices and 50k users, kept up to date from change to change.

A device add, enable or disable, a membership change must not pass over every device and
user (the name and key checks, finding the device, its owner's devices, the first free pool
address): Identities (control/model.py) answers them from one Lookups. Each part is worked out
when first asked, and a change that makes new identities from old ones (Identities.adding_device
and the like) updates the parts in place and hands them on: a Lookups serves exactly the
identities whose users and devices tuples it was made or last updated for (`serves`). The
identities it was handed on from no longer match, and work out their own again if asked (a
change that failed after making its new identities: once, on that error path).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional


class Lookups:
    def __init__(self, users: tuple, devices: tuple):
        self.users_of, self.devices_of = users, devices     # the tuples this serves (compared by identity)
        self._users: Optional[dict] = None         # user key -> User (the last of a key, as a dict makes it)
        self._user_at: Optional[dict] = None       # user key -> its index in users
        self._devices: Optional[dict] = None       # device name -> Device (the first of a name)
        self._device_at: Optional[dict] = None     # device name -> its index in devices
        self._owned: Optional[dict] = None         # user key -> its devices' names, in the devices' order
        self._keys: Optional[dict] = None          # public key -> how many devices have it
        self._v4: Optional[dict] = None            # tunnel IPv4 (an int) -> how many devices have it
        self.free: dict[int, int] = {}             # pool start -> an address below which all are in use

    def serves(self, users: tuple, devices: tuple) -> bool:
        return users is self.users_of and devices is self.devices_of

    def handed_on(self, users: tuple, devices: tuple) -> "Lookups":
        self.users_of, self.devices_of = users, devices
        return self

    # -----------------------------------------------------------------------------------------
    # the parts, each worked out when first asked

    @property
    def users(self) -> dict:
        if self._users is None:
            self._users = {u.key: u for u in self.users_of}
        return self._users

    @property
    def user_at(self) -> dict:
        if self._user_at is None:
            self._user_at = {u.key: i for i, u in enumerate(self.users_of)}
        return self._user_at

    @property
    def devices(self) -> dict:
        if self._devices is None:   # reversed: the first device of a name is the one kept
            self._devices = {d.name: d for d in reversed(self.devices_of)}
        return self._devices

    @property
    def device_at(self) -> dict:
        if self._device_at is None:
            n = len(self.devices_of)
            self._device_at = {d.name: n - 1 - i for i, d in enumerate(reversed(self.devices_of))}
        return self._device_at

    @property
    def owned(self) -> dict:
        if self._owned is None:
            owned: dict[str, list] = {}
            for d in self.devices_of:
                owned.setdefault(d.user, []).append(d.name)
            self._owned = owned
        return self._owned

    @property
    def keys(self) -> dict:
        if self._keys is None:
            self._keys = _counts(d.public_key for d in self.devices_of if d.public_key)
        return self._keys

    @property
    def v4(self) -> dict:
        if self._v4 is None:
            self._v4 = _counts(int(d.tunnel_ipv4) for d in self.devices_of)
        return self._v4

    def work_out(self) -> None:
        """Every part, now (after a start or a whole apply: the changes then hand them on)."""
        for part in (self.users, self.user_at, self.devices, self.device_at, self.owned, self.keys, self.v4):
            assert part is not None

    # -----------------------------------------------------------------------------------------
    # changes: each updates the parts worked out so far (the others stay to be worked out)

    def device_added(self, d, index: int) -> None:
        """D is at INDEX, after every other device."""
        if self._devices is not None:
            self._devices.setdefault(d.name, d)
        if self._device_at is not None:
            self._device_at.setdefault(d.name, index)
        if self._owned is not None:
            self._owned.setdefault(d.user, []).append(d.name)
        if self._keys is not None and d.public_key:
            _more(self._keys, d.public_key)
        if self._v4 is not None:
            _more(self._v4, int(d.tunnel_ipv4))
        # an address more in use: what was all in use still is

    def device_replaced(self, old, new) -> None:
        """OLD, the device of its name, is NEW now (the same name, at the same index)."""
        if self._devices is not None:
            self._devices[new.name] = new
        if old.user != new.user and self._owned is not None:
            self._owned = None                      # (no change does this: worked out again if asked)
        if old.public_key != new.public_key and self._keys is not None:
            if old.public_key:
                _less(self._keys, old.public_key)
            if new.public_key:
                _more(self._keys, new.public_key)
        if old.tunnel_ipv4 != new.tunnel_ipv4:
            if self._v4 is not None:
                _more(self._v4, int(new.tunnel_ipv4))
            self._address_freed(int(old.tunnel_ipv4))

    def devices_removed(self, gone: list) -> None:
        """The devices GONE (each the device of its name) are no longer there; the indexes of
        those after them moved, so device_at is worked out again when next asked."""
        self._device_at = None
        for d in gone:
            if self._devices is not None:
                self._devices.pop(d.name, None)
            if self._owned is not None:
                names = self._owned.get(d.user, [])
                if d.name in names:
                    names.remove(d.name)
                if not names:
                    self._owned.pop(d.user, None)
            if self._keys is not None and d.public_key:
                _less(self._keys, d.public_key)
            self._address_freed(int(d.tunnel_ipv4))

    def user_added(self, u, index: int) -> None:
        if self._users is not None:
            self._users[u.key] = u
        if self._user_at is not None:
            self._user_at[u.key] = index

    def user_replaced(self, new) -> None:
        """The user of NEW's key is NEW now, at the same index."""
        if self._users is not None:
            self._users[new.key] = new

    def _address_freed(self, address: int) -> None:
        if self._v4 is not None:
            _less(self._v4, address)
        if self._v4 is None or address not in self._v4:
            self.free = {start: min(below, address) if start <= address else below
                         for start, below in self.free.items()}


def _counts(values) -> dict:
    return dict(Counter(values))     # (Counter counts in C)


def _more(counts: dict, value) -> None:
    counts[value] = counts.get(value, 0) + 1


def _less(counts: dict, value) -> None:
    left = counts.get(value, 0) - 1
    if left > 0:
        counts[value] = left
    else:
        counts.pop(value, None)
