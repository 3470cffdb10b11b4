"""`gateway teardown` reads the connectors' interfaces from the store without opening it as a
Store: an old store is not upgraded by a teardown, and its warnings (said by the daemon when it
opened the store) are not said a second time."""
import logging
import sqlite3

from control.model import Connector
from control.store import Store, connector_interfaces
from tests.unit.test_store_upgrade import schema_3_store


def test_teardown_reads_an_old_store_without_upgrading_it_or_warning(tmp_path, caplog):
    schema_3_store(tmp_path / "s3.db")
    with caplog.at_level(logging.DEBUG):
        assert connector_interfaces(tmp_path / "s3.db") == []
    assert caplog.records == []
    db = sqlite3.connect(tmp_path / "s3.db")
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (3,)
    db.close()


def test_teardown_finds_the_connectors_interfaces(tmp_path):
    store = Store(tmp_path / "z.db")
    with store.change(0, "two connectors") as tx:
        tx.add_connector(Connector("branch", "ztc-branch", 51821, "k1", "p1"))
        tx.add_connector(Connector("lab", "ztc-lab", 51822, "k2", "p2"))
    assert connector_interfaces(tmp_path / "z.db") == ["ztc-branch", "ztc-lab"]
    store.close()
    assert connector_interfaces(tmp_path / "z.db") == ["ztc-branch", "ztc-lab"]
