"""The store: a real SQLite file. Changes commit whole with a generation and an audit row, or
not at all; what goes in comes out equal."""
import ipaddress
import sqlite3

import pytest

from control.errors import InputError
from control.files import load_identities, load_policy
from control.model import Device
from control.store import Store
from tests.examples import LAB


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state" / "ztgate.db")
    yield s
    s.close()


def test_fresh_store_is_empty_default_block(store, tmp_path):
    assert store.generation() == 0
    assert store.identities().users == () and store.identities().devices == ()
    assert store.policy().default_action == "block" and store.policy().rules == ()
    assert oct((tmp_path / "state" / "ztgate.db").stat().st_mode & 0o777) == "0o600"
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_lab_files_round_trip_and_survive_reopen(store, tmp_path):
    policy, identities = load_policy(LAB / "policy.yaml"), load_identities(LAB / "identities.yaml")
    with store.change(1000, "policy apply", {"policy": "lab"}) as tx:
        tx.replace_policy(policy)
        tx.replace_identities(identities)
    assert store.policy() == policy
    assert store.identities() == identities
    store.close()
    again = Store(tmp_path / "state" / "ztgate.db")
    assert again.generation() == 1 and again.policy() == policy and again.identities() == identities
    assert again.audit()[-1]["uid"] == 1000 and again.audit()[-1]["what"] == "policy apply"
    again.close()


def test_a_failed_change_leaves_nothing(store):
    with store.change(0, "user add") as tx:
        tx.add_user("alice@example.com", ["staff"])
    with pytest.raises(RuntimeError):
        with store.change(0, "device add") as tx:
            tx.add_device(Device("a", "alice@example.com", ipaddress.IPv4Address("100.96.0.2")))
            raise RuntimeError("the kernel refused")
    assert store.identities().devices == () and store.generation() == 1
    assert [a["what"] for a in store.audit()] == ["user add"]


def test_constraints_are_input_errors_and_roll_back(store):
    with store.change(0, "user add") as tx:
        tx.add_user("alice@example.com")
    with pytest.raises(InputError, match="UNIQUE"):
        with store.change(0, "user add") as tx:
            tx.add_user("ALICE@example.com")    # emails compare case-insensitively
    with pytest.raises(InputError, match="FOREIGN KEY"):
        with store.change(0, "device add") as tx:
            tx.add_device(Device("x", "nobody@example.com", ipaddress.IPv4Address("100.96.0.9")))
    assert store.generation() == 1


def test_device_enable_remove_and_user_groups(store):
    with store.change(0, "setup") as tx:
        tx.add_user("bob@example.com", ["staff"])
        tx.add_device(Device("bob-laptop", "bob@example.com", ipaddress.IPv4Address("100.96.0.3"),
                             ipaddress.IPv6Address("fd00:5a::3"), "k" * 43 + "=", True))
    with store.change(0, "disable") as tx:
        tx.set_device_enabled("bob-laptop", False)
        tx.set_user_groups("bob@example.com", ["staff", "developers"])
    ids = store.identities()
    assert not ids.devices[0].enabled and set(ids.users[0].groups) == {"staff", "developers"}
    assert store.groups() == {"developers": ["bob@example.com"], "staff": ["bob@example.com"]}
    with store.change(0, "remove") as tx:
        tx.remove_device("bob-laptop")
        tx.remove_user("bob@example.com")
    assert store.identities().users == () and store.groups() == {"developers": [], "staff": []}


def test_newer_schema_is_refused(tmp_path):
    s = Store(tmp_path / "db")
    s.db.execute("UPDATE meta SET value=99 WHERE key='schema'")
    s.close()
    with pytest.raises(InputError, match="schema 99"):
        Store(tmp_path / "db")


def test_committed_change_is_on_disk_for_another_connection(store, tmp_path):
    with store.change(0, "user add") as tx:
        tx.add_user("carol@example.com")
    other = sqlite3.connect(tmp_path / "state" / "ztgate.db")
    assert other.execute("SELECT email FROM users").fetchall() == [("carol@example.com",)]
    other.close()


def test_connectors_and_routes_round_trip(store):
    from control.model import Connector
    c = Connector("lan", "ztc-lan", 51821, "priv", "pub")
    with store.change(0, "connector add") as tx:
        tx.add_connector(c)
    with store.change(0, "route add") as tx:
        tx.add_route(ipaddress.ip_network("10.20.0.0/16"), "lan")
        tx.add_route(ipaddress.ip_network("fd20::/64"), "lan")
    (got,) = store.connectors()
    assert got.name == "lan" and got.listen_port == 51821 and got.routes == (
        ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("fd20::/64"))
    with pytest.raises(InputError, match="store refused"):
        with store.change(0, "route add") as tx:
            tx.add_route(ipaddress.ip_network("10.30.0.0/16"), "no-such-connector")
    with pytest.raises(InputError, match="store refused"):
        with store.change(0, "connector add") as tx:
            tx.add_connector(Connector("dup", "ztc-dup", 51821, "p", "q"))      # the port is taken
    assert store.generation() == 2


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    """A database written before connectors existed opens with its data and gains the tables."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    from control.store import SCHEMA
    db.executescript(SCHEMA[:SCHEMA.index("CREATE TABLE connectors")])
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", 1), ("generation", 7), ("default_action", "block")])
    db.execute("INSERT INTO users VALUES ('ann@example.com', 0)")
    db.commit()
    db.close()
    s = Store(path)
    assert s.generation() == 7 and [u.email for u in s.identities().users] == ["ann@example.com"]
    assert s.connectors() == [] and s._meta("schema") == 4   # (every migration ran: 1 -> 2 -> 3 -> 4)
    s.close()


def test_replace_rules_writes_the_rules_that_changed_and_ends_where_replace_policy_would(store):
    """A rule change writes only its rules (Change.replace_rules); what is stored after is the
    new policy, also when a precedence passes from one rule to another."""
    from dataclasses import replace

    policy = load_policy(LAB / "policy.yaml")
    with store.change(0, "apply") as tx:
        tx.replace_policy(policy)
    a, b = policy.rules[0], policy.rules[1]
    steps = [policy.rules[1:],                                                  # removed
             (replace(a, name="again"),) + policy.rules[1:],                    # added
             (replace(a, name="again", precedence=b.precedence), replace(b, precedence=a.precedence))
             + policy.rules[2:]]                                                # precedences swapped
    stored = policy
    for rules in steps:
        new = replace(stored, rules=rules)
        with store.change(0, "rule change") as tx:
            tx.replace_rules(stored, new)
        assert sorted(store.policy().rules, key=lambda r: r.name) == sorted(new.rules, key=lambda r: r.name)
        stored = new
