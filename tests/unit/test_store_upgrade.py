"""A schema-3 store (written before emails were ASCII only) upgraded in place: its users with a
non-ASCII email keep their groups, devices and rules (every email keyed by model.fold, as
SQLite's NOCASE compares), and the operator is told what to do about them."""
import logging
from dataclasses import replace
import sqlite3

from control.compiler import compile_policy
from control.gateway import admission
from control.files import parse_policy
from control.store import SCHEMA, Store


def schema_3_store(path):
    db = sqlite3.connect(path)
    db.executescript(SCHEMA[:SCHEMA.index("CREATE TABLE deleted_users")])
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", 3), ("generation", 5), ("default_action", "block")])
    db.executemany("INSERT INTO users (email, created) VALUES (?, 0)", [("Élise@Example.com",), ("Bob@Example.com",)])
    db.execute("INSERT INTO users (email, created, issuer, subject, scim_id) "
               "VALUES ('Carol@Example.com', 0, 'https://idp', 'sub-c', 'scim-c')")
    db.execute("INSERT INTO groups VALUES ('staff', 0)")
    db.executemany("INSERT INTO members VALUES ('staff', ?)", [("Élise@Example.com",), ("Bob@Example.com",)])
    db.execute("INSERT INTO devices (name, user, public_key, tunnel_ipv4, enabled, created) "
               "VALUES ('elise-laptop', 'Élise@Example.com', ?, '100.64.0.2', 1, 0)", ("A" * 43 + "=",))
    db.commit()
    db.close()


def test_a_schema_3_store_with_a_non_ascii_email_compiles_after_the_upgrade(tmp_path, caplog):
    schema_3_store(tmp_path / "s3.db")
    with caplog.at_level(logging.WARNING, "ztgate.store"):
        store = Store(tmp_path / "s3.db")
    ids = store.identities()
    elise = ids.find_user("Élise@Example.com")
    assert elise is not None and elise.groups == ("staff",)
    assert all(ids.find_user(d.user) is not None for d in ids.devices)
    policy = parse_policy({"default_action": "block", "rules": [
        {"name": "staff", "precedence": 10, "action": "allow", "principals": ["group:staff", "user:Élise@Example.com"],
         "destination": {"cidrs": ["10.0.0.0/8"]}}]}, "test")
    compile_policy(policy, ids)                       # KeyError before: device owners keyed by str.lower()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "Élise@Example.com" in warned[0] and "ztgate user remove" in warned[0]
    store.close()


def test_the_upgrade_records_which_users_were_made_by_hand(tmp_path):
    schema_3_store(tmp_path / "s3.db")
    store = Store(tmp_path / "s3.db")
    ids = store.identities()
    assert [(u.email, u.by_hand) for u in ids.users] == [
        ("Élise@Example.com", True), ("Bob@Example.com", True), ("Carol@Example.com", False)]
    with store.change(0, "a login") as tx:           # a hand-made user who logs in stays hand-made
        tx.put_idp_user(replace(ids.find_user("bob@example.com"), issuer="https://idp", subject="sub-b"))
        tx.add_user("dan@example.com")
    again = store.identities()
    bob = again.find_user("bob@example.com")
    assert bob.issuer == "https://idp" and bob.by_hand and again.find_user("dan@example.com").by_hand
    assert admission.hand_made(again, bob)[0] == 409
    assert admission.hand_made(again, again.find_user("carol@example.com")) is None
    store.close()
