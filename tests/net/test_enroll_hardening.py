"""The enrollment service against a hostile client and the IdP's deletions (a review's findings),
on the site of test_enroll.py: the real daemon serving HTTPS in a namespace, the lab's real
OpenID provider, a device namespace (198.18.0.11) as the client, and the real store file.

- idle connections (TLS or plain TCP, or a request a byte at a time) from one address neither
  take the service from others nor last past the deadline (control/identity/front.py);
- a user the IdP deleted is not enrolled again by a token issued before the deletion;
- `device expire` / `user expire` make the user log in again: older tokens are refused;
- a user's devices are capped; emails fold ASCII only; SCIM does not take hand-made users.
"""
from __future__ import annotations

import select
import socket
import ssl
import time

import httpx

from control.identity import front
from tests.net.test_enroll import URL, approve, new_key, site  # noqa: F401 (site: the fixture)

HOST, PORT = "198.18.0.1", 8443
SLACK = 5.0               # seconds past a deadline by which a connection must be closed


def open_idle(site, tls: bool, n: int) -> list:
    """N connections from the device namespace that send nothing (TLS: after the handshake).
    Those the gateway closes at once are left out."""
    out = []
    with site.ns.inside("dev"):
        for _ in range(n):
            s = socket.create_connection((HOST, PORT), timeout=5)
            if tls:
                try:
                    s = site.tls.wrap_socket(s, server_hostname=HOST)
                except (ssl.SSLError, OSError):
                    s.close()
                    continue
            out.append(s)
    return out


def closed_by(sockets: list, deadline: float) -> bool:
    """Every socket of SOCKETS is closed by its peer (EOF or reset) before DEADLINE (monotonic)."""
    open_ = list(sockets)
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(open_, [], [], 0.5)
        for s in ready:
            try:
                s.setblocking(False)
                data = s.recv(1024)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                open_.remove(s)
        for s in open_:
            if isinstance(s, ssl.SSLSocket) and s.pending():
                s.recv(1024)
    return not open_


def test_idle_connections_from_one_address_hold_nothing_for_long(site):
    t0 = time.monotonic()
    plain = open_idle(site, tls=False, n=20)           # plain TCP on the TLS port: no handshake ever
    held = open_idle(site, tls=True, n=300)            # more than uvicorn's 256 slots, were they all let in
    assert len(held) <= front.PER_ADDRESS - len(plain)
    started = time.monotonic()
    r = site.call("GET", "/", ns="gw")                 # another address: answered, and promptly
    assert r.status_code == 200 and time.monotonic() - started < 3, r.text
    scim = site.call("GET", "/scim/v2/Users", token=site.scim_token, ns="gw")
    assert scim.status_code == 200, scim.text
    assert closed_by(plain + held, t0 + max(front.HANDSHAKE_SECONDS, front.REQUEST_SECONDS) + SLACK + 10)
    assert site.call("GET", "/").status_code == 200    # the address's places are free again
    for s in plain + held:
        s.close()


def test_a_request_sent_a_byte_at_a_time_is_cut_at_the_deadline(site):
    with site.ns.inside("dev"):
        s = site.tls.wrap_socket(socket.create_connection((HOST, PORT), timeout=5), server_hostname=HOST)
    t0 = time.monotonic()
    cut = None
    s.setblocking(False)
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        try:
            s.send(bytes([byte]))
        except OSError:
            cut = time.monotonic() - t0
            break
        if closed_by([s], time.monotonic() + 0.5):
            cut = time.monotonic() - t0
            break
    s.close()
    assert cut is not None and cut < front.REQUEST_SECONDS + SLACK, cut


def later(site, email: str, seconds: int = 2, **claims) -> str:
    """A token issued SECONDS from now (iat: whole seconds; a token of the same second as an
    event counts as before it)."""
    return site.idp.token(email, iat=int(time.time()) + seconds, **claims)


def enroll(site, token: str, name: str, key: str | None = None):
    return site.call("POST", "/v1/devices", token, {"name": name, "public_key": key or new_key()})


def test_a_user_scim_deleted_is_not_enrolled_again_by_a_token_of_before(site):
    old = site.idp.token("frank@example.com")
    assert enroll(site, old, "frank-laptop").status_code == 201
    frank = site.scim("POST", "/Users", {"userName": "frank@example.com"})
    assert frank.status_code == 201, frank.text
    assert site.scim("DELETE", f"/Users/{frank.json()['id']}").status_code == 204
    before = site.snapshot()
    for r in (enroll(site, old, "frank-laptop-2"), enroll(site, site.idp.token("frank@example.com"), "frank-phone")):
        assert r.status_code == 403 and "deleted by the identity provider" in r.json()["error"], r.text
    # made again at the IdP (SCIM) or not, a token of before stays refused
    again = site.scim("POST", "/Users", {"userName": "frank@example.com"})
    assert again.status_code == 201, again.text
    assert enroll(site, old, "frank-laptop-2").status_code == 403
    assert site.snapshot()[1] == before[1]                  # no peer was added
    # a login after the deletion (a token issued since) enrolls
    assert enroll(site, later(site, "frank@example.com"), "frank-laptop-2").status_code == 201


def test_a_page_login_of_before_a_scim_deletion_enrolls_nothing(site):
    browser = httpx.Client(verify=site.tls, timeout=30)
    start = site.call("GET", "/login", ns="gw", client=browser)
    done = approve(site, browser, start.headers["location"], "bob@example.com")
    assert site.call("GET", done.headers["location"][len(URL):], ns="gw", client=browser).status_code == 303
    page = site.call("GET", "/", ns="gw", client=browser)
    csrf = page.text.split("name=csrf value='")[1].split("'")[0]
    bob = site.scim("POST", "/Users", {"userName": "bob@example.com"}).json()["id"]
    assert site.scim("DELETE", f"/Users/{bob}").status_code == 204
    before = site.snapshot()
    r = site.call("POST", "/enroll", ns="gw", client=browser, data={"name": "bob-tablet", "csrf": csrf})
    assert r.status_code == 403 and "deleted by the identity provider" in r.text
    assert site.snapshot() == before


def test_the_expire_verbs_make_the_user_log_in_again(site):
    old = site.idp.token("grace@example.com")
    assert enroll(site, old, "grace-laptop").status_code == 201
    site.ztgate("device", "expire", "grace-laptop")
    before = site.snapshot()
    r = site.call("POST", "/v1/devices/grace-laptop/session", old)
    assert r.status_code == 401 and r.json()["error"].startswith("iat: the session of device 'grace-laptop'"), r.text
    assert site.snapshot() == before
    assert site.call("POST", "/v1/devices/grace-laptop/session", later(site, "grace@example.com")).status_code == 200
    fresh = later(site, "grace@example.com")
    time.sleep(2)
    site.ztgate("user", "expire", "grace@example.com")
    before = site.snapshot()
    for r in (site.call("POST", "/v1/devices/grace-laptop/session", fresh), enroll(site, fresh, "grace-phone")):
        assert r.status_code == 401 and r.json()["error"].startswith("iat: the sessions of 'grace@example.com'"), \
            r.text
    assert site.snapshot() == before
    assert enroll(site, later(site, "grace@example.com"), "grace-phone").status_code == 201


def test_a_user_enrolls_at_most_max_devices(site):
    token = site.idp.token("henry@example.com")
    for i in range(10):                                # identity.max_devices: 10 by default
        assert enroll(site, token, f"henry-{i}").status_code == 201
    before = site.snapshot()
    r = enroll(site, token, "henry-10")
    assert r.status_code == 403 and "as many as identity.max_devices allows (10)" in r.json()["error"], r.text
    assert site.snapshot() == before
    assert site.call("POST", "/v1/devices/henry-3/session", token).status_code == 200     # renewals go on


def test_an_email_with_a_kelvin_sign_is_not_another_users(site):
    """K (U+212A, KELVIN SIGN) lower-cases to an ASCII k: 'Karl' must not become karl."""
    site.ztgate("user", "add", "karl@example.com")
    kelvin = "\u212aarl@example.com"
    before = site.snapshot()
    r = enroll(site, site.idp.admin.token("karl@example.com", None, 300, {"email": kelvin}), "karl-laptop")
    assert r.status_code == 401 and "only ASCII email addresses" in r.json()["error"], r.text
    assert "identity.email_claim" in r.json()["error"], r.text
    s = site.scim("POST", "/Users", {"userName": kelvin})
    assert s.status_code == 400 and "only ASCII" in s.json()["detail"], s.text
    assert site.scim("GET", '/Users?filter=userName%20eq%20%22%E2%84%AAarl@example.com%22').json()["totalResults"] == 0
    assert site.snapshot() == before


def test_scim_does_not_take_over_users_made_by_hand(site):
    site.ztgate("user", "add", "ivan@example.com")
    before = site.snapshot()
    r = site.scim("POST", "/Users", {"userName": "ivan@example.com"})
    assert r.status_code == 409 and "was made by hand: SCIM does not take it over" in r.json()["detail"], r.text
    assert r.json()["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert site.snapshot() == before
    # a user the IdP made (a login) who also has a device enrolled by hand
    assert enroll(site, site.idp.token("judy@example.com"), "judy-laptop").status_code == 201
    site.ztgate("device", "add", "judy-pc", "--user", "judy@example.com", "--public-key", new_key())
    before = site.snapshot()
    r = site.scim("POST", "/Users", {"userName": "judy@example.com"})
    assert r.status_code == 409 and "has devices enrolled by hand (judy-pc)" in r.json()["detail"], r.text
    assert site.snapshot() == before


def test_a_renewal_does_not_give_a_hand_made_device_a_session(site):
    key = new_key()
    site.ztgate("user", "add", "kim@example.com")
    site.ztgate("device", "add", "kim-pc", "--user", "kim@example.com", "--public-key", key)
    before = site.snapshot()
    r = enroll(site, site.idp.token("kim@example.com"), "kim-pc", key)
    assert r.status_code == 409 and "enrolled by hand and has no session" in r.json()["error"], r.text
    assert "ztgate device remove kim-pc" in r.json()["error"], r.text
    assert site.snapshot() == before


def test_a_hand_made_user_stays_the_operators_after_it_logs_in(site):
    site.ztgate("user", "add", "mia@example.com")
    assert enroll(site, site.idp.token("mia@example.com"), "mia-laptop").status_code == 201
    before = site.snapshot()
    r = site.scim("POST", "/Users", {"userName": "mia@example.com"})
    assert r.status_code == 409 and "was made by hand: SCIM does not take it over" in r.json()["detail"], r.text
    assert site.snapshot() == before
