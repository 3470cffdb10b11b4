"""What sessions add outside the kernel: an identities file applied keeps what the store holds
from the identity provider; the session column of `device list`; SessionRefused."""
import ipaddress
import time

from control.cli.sessions import session_column
from control.errors import ZtError
from control.gateway.sessions import SessionRefused, kept_from_provider
from control.model import Device, Identities, User

V4 = ipaddress.IPv4Address


def test_an_identities_file_keeps_provider_fields_and_sessions_of_what_stays():
    old = Identities(
        (User("ann@example.com", ("local",), ("devs",), "https://idp", "s-1", False, "scim-1", "x"),),
        (Device("ann-pc", "ann@example.com", V4("100.96.0.2"), None, "key-1", True, 1000.0),
         Device("ann-phone", "ann@example.com", V4("100.96.0.3"), None, "key-2", True, 2000.0)))
    new = Identities(
        (User("Ann@example.com", ("ops",)), User("bob@example.com", ())),
        (Device("ann-pc", "ann@example.com", V4("100.96.0.2"), None, "key-1"),
         Device("ann-phone", "ann@example.com", V4("100.96.0.3"), None, "another-key"),
         Device("bob-pc", "bob@example.com", V4("100.96.0.4"), None, "key-3")))
    kept = kept_from_provider(old, new)
    ann, bob = kept.users
    assert ann == User("Ann@example.com", ("ops",), ("devs",), "https://idp", "s-1", False, "scim-1", "x")
    assert bob == new.users[1]
    # a device keeps its session only with its key: the same name with another key is another device
    assert [d.session_expires for d in kept.devices] == [1000.0, None, None]


def test_device_list_says_when_a_session_ends():
    assert session_column(None) == "-"
    assert session_column(time.time() + 7200.5).endswith("(2h)") and session_column(time.time() + 7200).startswith(
        "until ")
    assert session_column(time.time() - 5).startswith("expired ")


def test_a_refusal_carries_its_http_status_and_is_a_bad_request_for_the_cli():
    e = SessionRefused(409, "device name 'x' is taken")
    assert isinstance(e, ZtError) and e.status == 409 and e.exit_status == 2 and str(e) == "device name 'x' is taken"
