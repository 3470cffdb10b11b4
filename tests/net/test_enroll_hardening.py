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

from control.identity import front
from tests.net.test_enroll import URL, new_key, site  # noqa: F401 (site: the fixture)

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
