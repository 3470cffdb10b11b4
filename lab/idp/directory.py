"""The provider's users: email, password (for the login form), groups, a stable subject, and
whether the account is active. Read from a users file (YAML, below) on start; what changes at
run time (subjects, groups set by the admin, deprovisioning) is kept in STATE/users.json.

    users:
      - email: alice@example.com
        password: alice-password
        groups: [developers, staff]
"""
from __future__ import annotations

import hmac
import json
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml


@dataclass
class User:
    email: str
    sub: str
    groups: list[str] = field(default_factory=list)
    password: Optional[str] = None      # None: the user cannot log in with the form (admin-minted only)
    active: bool = True


class Directory:
    def __init__(self, state: Path, users_file: Optional[Path] = None):
        self.path = state
        self._lock = threading.Lock()
        self._users: dict[str, User] = {}
        if state.exists():
            for row in json.loads(state.read_text()):
                self._users[row["email"]] = User(**row)
        if users_file:
            for row in (yaml.safe_load(users_file.read_text()) or {}).get("users", []):
                self.add(row["email"], row.get("groups", []), row.get("password"), keep_state=True)
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([asdict(u) for u in self._users.values()], f, indent=1)
        os.replace(tmp, self.path)

    def add(self, email: str, groups: list[str], password: Optional[str] = None,
            keep_state: bool = False) -> User:
        """A new user gets a random, stable subject. keep_state: a user already known keeps the
        groups and the active flag the admin set (the users file seeds, the state rules)."""
        with self._lock:
            user = self._users.get(email)
            if user is None:
                user = self._users[email] = User(email, str(uuid.uuid4()), list(groups), password)
            else:
                user.password = password if password is not None else user.password
                if not keep_state:
                    user.groups = list(groups)
            self._save()
            return user

    def get(self, email: str) -> Optional[User]:
        with self._lock:
            return self._users.get(email)

    def by_sub(self, sub: str) -> Optional[User]:
        with self._lock:
            return next((u for u in self._users.values() if u.sub == sub), None)

    def login(self, email: str, password: str) -> Optional[User]:
        """The active user with this email and password, else None."""
        user = self.get(email)
        if user is None or not user.active or user.password is None:
            return None
        return user if hmac.compare_digest(user.password.encode(), password.encode()) else None

    def set_groups(self, email: str, groups: list[str]) -> User:
        with self._lock:
            user = self._users[email]
            user.groups = list(groups)
            self._save()
            return user

    def deactivate(self, email: str) -> User:
        with self._lock:
            user = self._users[email]
            user.active = False
            self._save()
            return user

    def all(self) -> list[User]:
        with self._lock:
            return list(self._users.values())
