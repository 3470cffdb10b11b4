"""Login floors (control/gateway/floors.py) on a real store: every SCIM deletion of an email is
remembered, so a second deletion does not forget the subject of the first."""
from control.gateway import floors
from control.model import User
from control.store import Store


def test_two_deletions_of_one_email_keep_both_subjects(tmp_path):
    store = Store(tmp_path / "z.db")
    first = User("Eve@example.com", (), issuer="https://idp", subject="sub-1")
    second = User("eve@example.com", (), issuer="https://idp", subject="sub-2")
    with store.change(0, "scim delete") as tx:
        floors.note_deleted(tx, first, 1000.0)
    with store.change(0, "scim delete") as tx:
        floors.note_deleted(tx, second, 2000.0)
    # sub-1 under a new email: still refused for a token of before its deletion
    assert floors.deleted_at(store.db, "https://idp", "sub-1", "eve.new@example.com") == 1000.0
    assert floors.deleted_at(store.db, "https://idp", "sub-2", "other@example.com") == 2000.0
    assert floors.deleted_at(store.db, "https://idp", "sub-3", "EVE@example.com") == 2000.0
    refused = floors.too_early(store.db, issuer="https://idp", subject="sub-1", email="eve.new@example.com",
                               device=None, issued_at=999.0)
    assert refused is not None and refused[0] == 403
    store.close()
