"""Tokens issued too early: an ID token stays valid until its `exp` whatever the gateway did
meanwhile, so the gateway remembers when it took a login away and refuses tokens issued (`iat`)
before then (IDENTITY.md, "Sessions"; store schema 4):

- a user SCIM deleted (deleted_users: by email, and by issuer and subject when it had logged
  in): a token or a page login of before the deletion does not enroll it again, as a new user
  or as one made again since (by SCIM POST or by hand). Nothing lifts the row: a user the
  IdP creates again logs in anew, with a token issued after the deletion, which is let in;
- `ztgate user expire` (sessions_ended, kind "user") and `ztgate device expire` (kind "device"):
  a token of before does not log the user in, or renew that device, again.

A token's `iat` is in whole seconds: one issued in the same second as the event counts as
before it (the user logs in again a second later). `auth_time` is not used: an IdP that keeps
its own session (SSO) issues fresh tokens with an old auth_time, and the user could never
come back.
"""
from __future__ import annotations

import time
from typing import Optional

from ..model import User, fold


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def note_deleted(tx, user: User, at: float) -> None:
    """In the deletion's transaction (tx: a store Change)."""
    # one row per deletion (never replaced): the email's earlier subjects stay refused too
    tx._exec("INSERT INTO deleted_users VALUES (?, ?, ?, ?)", (user.key, user.issuer, user.subject, at))


def note_ended(db, kind: str, name: str, at: float) -> None:
    """In the expiry's transaction (db: a Change's connection), or on its own (the store's)."""
    db.execute("INSERT OR REPLACE INTO sessions_ended VALUES (?, ?, ?)", (kind, fold(name), at))


def deleted_at(db, issuer: str, subject: str, email: str) -> Optional[float]:
    """When the user of (ISSUER, SUBJECT), or of EMAIL, was last deleted by SCIM (None: never)."""
    row = db.execute("SELECT max(deleted) FROM deleted_users WHERE (issuer=? AND subject=?) OR email=?",
                     (issuer, subject, fold(email))).fetchone()
    return row[0] if row else None


def ended_at(db, kind: str, name: str) -> Optional[float]:
    row = db.execute("SELECT ended FROM sessions_ended WHERE kind=? AND name=?", (kind, fold(name))).fetchone()
    return row[0] if row else None


def too_early(db, *, issuer: str, subject: str, email: str, device: Optional[str],
              issued_at: Optional[float]) -> Optional[tuple[int, str]]:
    """(HTTP status, why) when a token of (ISSUER, SUBJECT, EMAIL) issued at ISSUED_AT may not
    log in, or renew DEVICE (None: a new device); None when it may. ISSUED_AT None: the caller
    is the gateway's socket (root), not a token."""
    if issued_at is None:
        return None
    deleted = deleted_at(db, issuer, subject, email)
    if deleted is not None and issued_at <= deleted:
        return 403, (f"user {email!r} was deleted by the identity provider at {when(deleted)}, after this "
                     "token was issued: log in again")
    ended = ended_at(db, "user", email)
    if ended is not None and issued_at <= ended:
        return 401, (f"iat: the sessions of {email!r} were ended at {when(ended)}, after this token was issued: "
                     "log in again")
    if device is not None:
        ended = ended_at(db, "device", device)
        if ended is not None and issued_at <= ended:
            return 401, (f"iat: the session of device {device!r} was ended at {when(ended)}, after this token was "
                         "issued: log in again")
    return None
