"""The gateway's truth: users, groups, devices, rules, the policy generation and an audit trail,
in one SQLite database (WAL) in the state directory. The kernel is always derived from it.

Every change is one transaction (`Store.change`): it moves the generation on by one and writes
an audit row, or, when anything in it fails, leaves the database exactly as it was.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .errors import InputError
from .files import parse_policy, rule_doc
from .model import Connector, Device, Identities, Policy, User, fold

log = logging.getLogger("ztgate.store")

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE users (email TEXT PRIMARY KEY COLLATE NOCASE, created REAL NOT NULL);
CREATE TABLE groups (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE members (
    grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    user TEXT NOT NULL REFERENCES users(email) ON DELETE CASCADE,
    PRIMARY KEY (grp, user));
CREATE TABLE devices (
    name TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(email),
    public_key TEXT UNIQUE,
    tunnel_ipv4 TEXT NOT NULL UNIQUE,
    tunnel_ipv6 TEXT UNIQUE,
    enabled INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE rules (name TEXT PRIMARY KEY, precedence INTEGER NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE local_groups (name TEXT PRIMARY KEY, members TEXT NOT NULL);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY, generation INTEGER NOT NULL, time REAL NOT NULL, uid INTEGER NOT NULL,
    what TEXT NOT NULL, detail TEXT NOT NULL);
""" + """
CREATE TABLE connectors (
    name TEXT PRIMARY KEY, interface TEXT NOT NULL UNIQUE, listen_port INTEGER NOT NULL UNIQUE,
    private_key TEXT NOT NULL, public_key TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE routes (
    prefix TEXT PRIMARY KEY, connector TEXT NOT NULL REFERENCES connectors(name), created REAL NOT NULL);
"""
# What each schema version adds to the one before (a database is migrated in place on open).
MIGRATIONS = {2: SCHEMA[SCHEMA.index("CREATE TABLE connectors"):]}

# Schema 3: users and devices from the identity provider (IDENTITY.md). A user is keyed there
# by (issuer, subject), unique when set (SQLite's unique indexes let NULLs repeat); its
# provider groups are a JSON list; `active` 0: deprovisioned (its devices' packets drop and
# it may not log in). A device's session_expires: unix seconds; NULL: no session.
IDP_COLUMNS = """
ALTER TABLE users ADD COLUMN issuer TEXT;
ALTER TABLE users ADD COLUMN subject TEXT;
ALTER TABLE users ADD COLUMN provider_groups TEXT;
ALTER TABLE users ADD COLUMN active INTEGER NOT NULL DEFAULT 1;
ALTER TABLE users ADD COLUMN scim_id TEXT;
ALTER TABLE users ADD COLUMN external_id TEXT;
CREATE UNIQUE INDEX users_idp_subject ON users(issuer, subject);
CREATE UNIQUE INDEX users_scim_id ON users(scim_id);
ALTER TABLE devices ADD COLUMN session_expires REAL;
"""
SCHEMA += IDP_COLUMNS
MIGRATIONS[3] = IDP_COLUMNS
SCHEMA_VERSION = 3

# Schema 4: tokens issued before a time are refused (IDENTITY.md; control/gateway/floors.py).
# deleted_users: a user SCIM deleted (by email, and by issuer and subject when it had logged
# in; one row per deletion, so a second deletion of an email does not forget the first subject)
# in), so that a token issued before the deletion does not enroll it again. sessions_ended:
# when `user expire` (kind "user", its email) or `device expire` ("device", its name) ended
# sessions, so that a token issued before does not renew them. users.origin: 'hand' (an
# operator made it: SCIM never takes it over, even after it logs in) or 'idp' (a login or
# SCIM made it); users of before are 'hand' when they had no identity at the provider.
LOGIN_FLOORS = """
CREATE TABLE deleted_users (
    email TEXT NOT NULL COLLATE NOCASE, issuer TEXT, subject TEXT, deleted REAL NOT NULL);
CREATE INDEX deleted_users_email ON deleted_users(email);
CREATE INDEX deleted_users_subject ON deleted_users(issuer, subject);
CREATE TABLE sessions_ended (
    kind TEXT NOT NULL, name TEXT NOT NULL COLLATE NOCASE, ended REAL NOT NULL, PRIMARY KEY (kind, name));
ALTER TABLE users ADD COLUMN origin TEXT NOT NULL DEFAULT 'hand';
UPDATE users SET origin='idp' WHERE issuer IS NOT NULL OR scim_id IS NOT NULL;
"""
SCHEMA += LOGIN_FLOORS
MIGRATIONS[4] = LOGIN_FLOORS
SCHEMA_VERSION = 4
USER_COLUMNS = "email, issuer, subject, provider_groups, active, scim_id, external_id, origin"


class Store:
    """One database file. Not thread-safe by itself: the daemon serialises calls."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not self.path.exists()
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if fresh:
            os.chmod(self.path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")     # a committed change survives power loss
        self.db.execute("PRAGMA foreign_keys=ON")
        # A whole identities write (policy apply: 100,000 devices and their indexes) outgrows
        # SQLite's 2 MiB page cache, which then spills pages mid-transaction: 16 MiB keeps it
        # in memory (the bench's large apply: store write 3.4 s instead of 4.8 s).
        self.db.execute("PRAGMA cache_size=-16384")
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
            with self._tx():
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                                    [("schema", SCHEMA_VERSION), ("generation", 0), ("default_action", "block")])
        version = self._meta("schema")
        while isinstance(version, int) and version < SCHEMA_VERSION and version + 1 in MIGRATIONS:
            with self._tx():
                for stmt in MIGRATIONS[version + 1].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (version + 1,))
            version = self._meta("schema")
        if version != SCHEMA_VERSION:
            raise InputError(f"{self.path}: database schema {version}, this ztgate reads {SCHEMA_VERSION}")
        # A user's memberships by user (a membership change rewrites them, a user's removal
        # cascades to them): without it each is a pass over every membership, ~20 ms at 50k
        # users. An index only: any schema-4 ztgate reads the store as before.
        self.db.execute("CREATE INDEX IF NOT EXISTS members_user ON members(user)")
        self._warn_non_ascii_emails()

    def _warn_non_ascii_emails(self) -> None:
        """Emails are ASCII only since schema 4, but an older store may hold others. They keep
        working as they are (compared by model.fold, as SQLite's NOCASE does: no Unicode case
        folding, so no two of them merge); refusing to open the store would leave the operator no
        daemon to remove them with. They cannot log in through the IdP, so the operator is told."""
        for (email,) in self.db.execute("SELECT email FROM users ORDER BY rowid"):
            if not email.isascii():
                log.warning("%s: user %r has a non-ASCII email, accepted before this version: it keeps its "
                            "rules and devices but cannot log in through the identity provider; if it should, "
                            "`ztgate user remove %s` and add it under an ASCII address", self.path, email, email)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    # -----------------------------------------------------------------------------------------
    # reading

    def generation(self) -> int:
        return int(self._meta("generation"))

    def identities(self) -> Identities:
        groups: dict[str, list[str]] = {}
        for grp, user in self.db.execute("SELECT grp, user FROM members ORDER BY grp"):
            groups.setdefault(fold(user), []).append(grp)
        users = tuple(User(email, tuple(groups.get(fold(email), ())), tuple(json.loads(pg or "[]")), issuer,
                           subject, bool(active), scim_id, external_id, origin == "hand")
                      for email, issuer, subject, pg, active, scim_id, external_id, origin in self.db.execute(
                          f"SELECT {USER_COLUMNS} FROM users ORDER BY rowid"))
        devices = tuple(
            Device(name, fold(user), ipaddress.IPv4Address(v4), ipaddress.IPv6Address(v6) if v6 else None,
                   key, bool(enabled), expires)
            for name, user, key, v4, v6, enabled, expires in self.db.execute(
                "SELECT name, user, public_key, tunnel_ipv4, tunnel_ipv6, enabled, session_expires FROM devices "
                "ORDER BY rowid"))
        return Identities(users, devices)

    def policy(self) -> Policy:
        doc = {"default_action": self._meta("default_action"),
               "groups": {name: json.loads(members)
                          for name, members in self.db.execute("SELECT name, members FROM local_groups")},
               "rules": [json.loads(body) for (body,) in
                         self.db.execute("SELECT body FROM rules ORDER BY precedence")]}
        return parse_policy(doc, "store")

    def groups(self) -> dict[str, list[str]]:
        """Identity groups (local to the gateway) and their members."""
        out = {name: [] for (name,) in self.db.execute("SELECT name FROM groups ORDER BY name")}
        for grp, user in self.db.execute("SELECT grp, user FROM members ORDER BY user"):
            out[grp].append(user)
        return out

    def connectors(self) -> list[Connector]:
        routes: dict[str, list] = {}
        for prefix, name in self.db.execute("SELECT prefix, connector FROM routes ORDER BY created"):
            routes.setdefault(name, []).append(ipaddress.ip_network(prefix))
        return [Connector(name, ifname, port, private, public, tuple(routes.get(name, ())))
                for name, ifname, port, private, public in self.db.execute(
                    "SELECT name, interface, listen_port, private_key, public_key FROM connectors ORDER BY created")]

    def created(self) -> dict[str, float]:
        """Device name -> when it was enrolled."""
        return dict(self.db.execute("SELECT name, created FROM devices"))

    def audit(self, limit: int = 50) -> list[dict]:
        rows = self.db.execute("SELECT generation, time, uid, what, detail FROM audit ORDER BY id DESC LIMIT ?",
                               (limit,)).fetchall()
        return [{"generation": g, "time": t, "uid": uid, "what": what, "detail": json.loads(detail)}
                for g, t, uid, what, detail in reversed(rows)]

    def note(self, uid: int, what: str, detail: Optional[dict] = None) -> None:
        """An audit row for an action that changes no configuration (ending a flow): at the
        generation in force, which does not move."""
        with self._tx():
            self.db.execute("INSERT INTO audit (generation, time, uid, what, detail) VALUES (?, ?, ?, ?, ?)",
                            (self.generation(), time.time(), uid, what, json.dumps(detail or {}, default=str)))

    # -----------------------------------------------------------------------------------------
    # changing

    @contextmanager
    def change(self, uid: int, what: str, detail: Optional[dict] = None) -> Iterator["Change"]:
        """One accepted change: everything written inside commits together with the next
        generation and its audit row, or nothing does (an exception rolls it all back)."""
        with self._tx():
            generation = self.generation() + 1
            self.db.execute("UPDATE meta SET value=? WHERE key='generation'", (generation,))
            self.db.execute("INSERT INTO audit (generation, time, uid, what, detail) VALUES (?, ?, ?, ?, ?)",
                            (generation, time.time(), uid, what, json.dumps(detail or {}, default=str)))
            yield Change(self.db, generation)


class Change:
    """The writes of one transaction. Constraint violations become InputError (exit 2)."""

    def __init__(self, db: sqlite3.Connection, generation: int):
        self.db, self.generation = db, generation

    def _exec(self, sql: str, args=()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, args)
        except sqlite3.IntegrityError as e:
            raise InputError(f"store refused the change: {e}") from None

    def add_user(self, email: str, groups=()) -> None:
        self._exec("INSERT INTO users (email, created, origin) VALUES (?, ?, 'hand')", (email, time.time()))
        self.set_user_groups(email, groups)

    def remove_user(self, email: str) -> None:
        self._exec("DELETE FROM users WHERE email=?", (email,))

    def set_user_groups(self, email: str, groups) -> None:
        self._exec("DELETE FROM members WHERE user=?", (email,))
        for g in groups:
            self._exec("INSERT OR IGNORE INTO groups VALUES (?, ?)", (g, time.time()))
            self._exec("INSERT INTO members VALUES (?, ?)", (g, email))

    def add_group(self, name: str) -> None:
        self._exec("INSERT INTO groups VALUES (?, ?)", (name, time.time()))

    def remove_group(self, name: str) -> None:
        self._exec("DELETE FROM groups WHERE name=?", (name,))

    def add_device(self, d: Device) -> None:
        self._exec("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (d.name, d.user, d.public_key, str(d.tunnel_ipv4),
                    str(d.tunnel_ipv6) if d.tunnel_ipv6 else None, int(d.enabled), time.time(), d.session_expires))

    def set_device_enabled(self, name: str, enabled: bool) -> None:
        self._exec("UPDATE devices SET enabled=? WHERE name=?", (int(enabled), name))

    def remove_device(self, name: str) -> None:
        self._exec("DELETE FROM devices WHERE name=?", (name,))

    def replace_policy(self, policy: Policy) -> None:
        self._exec("UPDATE meta SET value=? WHERE key='default_action'", (policy.default_action,))
        self._exec("DELETE FROM local_groups")
        self.db.executemany("INSERT INTO local_groups VALUES (?, ?)",
                            [(g, json.dumps(list(m))) for g, m in policy.groups.items()])
        self._exec("DELETE FROM rules")
        self.db.executemany("INSERT INTO rules VALUES (?, ?, ?)",
                            [(r.name, r.precedence, json.dumps(rule_doc(r))) for r in policy.rules])

    def replace_rules(self, old: Policy, new: Policy) -> None:
        """NEW's rules in place of OLD's (what the store holds), writing only the rules that
        are not the same objects in both: a rule change touches one or two, and the whole
        list is 10,000 documents at the bench's large scale (~150 ms). Deletes first, so
        that a precedence may pass from one rule to another."""
        before, after = dict(zip(map(id, old.rules), old.rules)), dict(zip(map(id, new.rules), new.rules))
        for key in before.keys() - after.keys():
            self._exec("DELETE FROM rules WHERE name=?", (before[key].name,))
        for key in after.keys() - before.keys():
            r = after[key]
            self._exec("INSERT INTO rules VALUES (?, ?, ?)", (r.name, r.precedence, json.dumps(rule_doc(r))))

    def add_connector(self, c: Connector) -> None:
        self._exec("INSERT INTO connectors VALUES (?, ?, ?, ?, ?, ?)",
                   (c.name, c.interface, c.listen_port, c.private_key, c.public_key, time.time()))

    def remove_connector(self, name: str) -> None:
        self._exec("DELETE FROM connectors WHERE name=?", (name,))

    def add_route(self, prefix, connector: str) -> None:
        self._exec("INSERT INTO routes VALUES (?, ?, ?)", (str(prefix), connector, time.time()))

    def remove_route(self, prefix) -> None:
        self._exec("DELETE FROM routes WHERE prefix=?", (str(prefix),))

    def replace_identities(self, identities: Identities) -> None:
        """Users and devices become exactly these; devices that stay keep their enrollment time."""
        created = dict(self.db.execute("SELECT name, created FROM devices"))
        for table in ("devices", "members", "users", "groups"):
            self._exec(f"DELETE FROM {table}")
        now = time.time()
        self.db.executemany(f"INSERT INTO users ({USER_COLUMNS}, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [_user_row(u) + (now,) for u in identities.users])
        groups = sorted({g for u in identities.users for g in u.groups})
        self.db.executemany("INSERT INTO groups VALUES (?, ?)", [(g, now) for g in groups])
        self.db.executemany("INSERT INTO members VALUES (?, ?)",
                            [(g, u.email) for u in identities.users for g in dict.fromkeys(u.groups)])
        rows = [(d.name, d.user, d.public_key, str(d.tunnel_ipv4), str(d.tunnel_ipv6) if d.tunnel_ipv6 else None,
                 int(d.enabled), created.get(d.name, now), d.session_expires) for d in identities.devices]
        try:        # one statement for all (100,000 at the bench's large scale: half the time of one each)
            self.db.executemany("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError as e:
            raise InputError(f"store refused the change: {e}") from None

    # users and devices from the identity provider (schema 3)

    def put_idp_user(self, u: User) -> None:
        """Add U, or write its identity-provider fields (not its gateway groups) if it exists."""
        row = _user_row(u)
        self._exec(f"INSERT INTO users ({USER_COLUMNS}, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                   "ON CONFLICT(email) DO UPDATE SET issuer=?, subject=?, provider_groups=?, active=?, scim_id=?, "
                   "external_id=?", row + (time.time(),) + row[1:7])      # (never its origin)

    def set_session(self, device: str, expires: Optional[float]) -> None:
        self._exec("UPDATE devices SET session_expires=? WHERE name=?", (expires, device))


def _user_row(u: User) -> tuple:
    """A user's USER_COLUMNS values."""
    return (u.email, u.issuer, u.subject, json.dumps(list(u.provider_groups)), int(u.active), u.scim_id,
            u.external_id, "hand" if u.by_hand else "idp")


def connector_interfaces(path: str | Path) -> list[str]:
    """The connectors' interface names in the store at PATH, read without opening it as a Store:
    no upgrade, no checks, no warnings (`gateway teardown` needs only these; the daemon told the
    rest when it opened the store). [] where the store has no connectors table (schema 1)."""
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [name for (name,) in db.execute("SELECT interface FROM connectors ORDER BY created")]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
