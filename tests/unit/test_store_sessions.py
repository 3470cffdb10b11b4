"""The store's users and devices from the identity provider (schema 3)."""
import ipaddress
import sqlite3

import pytest

from control.errors import InputError
from control.model import Device, User
from control.store import IDP_COLUMNS, SCHEMA, SCHEMA_VERSION, Store


def test_provider_users_and_sessions_round_trip(tmp_path):
    store = Store(tmp_path / "s.db")
    ann = User("Ann@example.com", (), ("developers", "ops"), "https://idp", "sub-1", True, "scim-1", "ext-1")
    with store.change(0, "login") as tx:
        tx.add_user("bob@example.com", ["local"])
        tx.put_idp_user(ann)
        tx.add_device(Device("ann-laptop", "ann@example.com", ipaddress.IPv4Address("100.96.0.2"), None, "k", True,
                             1234.5))
        tx.add_device(Device("bob-pc", "bob@example.com", ipaddress.IPv4Address("100.96.0.3")))
    ids = Store(tmp_path / "s.db").identities()
    assert ids.user("ann@example.com") == ann
    assert ids.user("bob@example.com") == User("bob@example.com", ("local",))
    assert [d.session_expires for d in ids.devices] == [1234.5, None]
    # an update keeps the user's gateway groups and moves only the provider's fields
    with store.change(0, "renewal") as tx:
        tx.put_idp_user(User("bob@example.com", (), ("devs",), "https://idp", "sub-2", False))
        tx.set_session("ann-laptop", 99.0)
    ids = store.identities()
    bob = ids.user("bob@example.com")
    assert bob.groups == ("local",) and bob.all_groups == ("local", "devs") and not bob.active
    assert ids.devices[0].session_expires == 99.0
    assert ids.session_expired(ids.devices[0], 100.0) and not ids.session_expired(ids.devices[0], 98.0)
    assert ids.session_expired(ids.devices[1], 0.0)       # bob is deprovisioned: even a hand-made device


def test_issuer_and_subject_and_scim_id_are_unique(tmp_path):
    store = Store(tmp_path / "s.db")
    with store.change(0, "login") as tx:
        tx.put_idp_user(User("a@example.com", (), (), "https://idp", "same", scim_id="s"))
        tx.put_idp_user(User("b@example.com", (), ()))    # none of them set: no clash
        tx.put_idp_user(User("c@example.com", (), ()))
    for clash in (User("d@example.com", (), (), "https://idp", "same"), User("d@example.com", (), (), scim_id="s")):
        with pytest.raises(InputError, match="store refused"):
            with store.change(0, "login") as tx:
                tx.put_idp_user(clash)
    assert store.generation() == 1


def test_a_version_2_database_gains_the_provider_columns(tmp_path):
    path = tmp_path / "v2.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA[:SCHEMA.index(IDP_COLUMNS)])
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", 2), ("generation", 3), ("default_action", "block")])
    db.execute("INSERT INTO users VALUES ('ann@example.com', 0)")
    db.execute("INSERT INTO devices VALUES ('ann-pc', 'ann@example.com', 'k', '100.96.0.2', NULL, 1, 0)")
    db.commit()
    db.close()
    s = Store(path)
    assert s._meta("schema") == SCHEMA_VERSION and s.generation() == 3
    (ann,) = s.identities().users
    assert ann.active and ann.issuer is None and ann.provider_groups == ()
    assert s.identities().devices[0].session_expires is None
