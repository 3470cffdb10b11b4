"""The enrollment service's door (control/identity/front.py) on loopback, with uvicorn's real
TLS server and a tiny ASGI app: idle TLS connections from several addresses (each up to the
cap) neither take the service from another address nor outlive the deadline, and a connection
cut at the deadline is told so (408)."""
from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import threading
import time

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control.identity import front

DEADLINE = 2          # seconds: the test's handshake and request deadlines


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            done = "lifespan.startup.complete" if m["type"] == "lifespan.startup" else "lifespan.shutdown.complete"
            await send({"type": done})
            if m["type"] != "lifespan.startup":
                return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


@pytest.fixture
def door(tmp_path, monkeypatch):
    monkeypatch.setattr(front, "HANDSHAKE_SECONDS", DEADLINE)
    monkeypatch.setattr(front, "REQUEST_SECONDS", DEADLINE)
    cert, key = self_signed(tmp_path)
    cfg = uvicorn.Config(app, host="127.0.0.1", port=0, ssl_certfile=str(cert), ssl_keyfile=str(key),
                         log_level="error", access_log=False, timeout_keep_alive=15, limit_concurrency=None,
                         h11_max_incomplete_event_size=16 << 10)
    cfg.load()
    server = front.GatedServer(cfg)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    server.port = server.servers[0].sock.getsockname()[1]
    yield server
    server.should_exit = True
    thread.join(timeout=10)


TLS = ssl.create_default_context()
TLS.check_hostname, TLS.verify_mode = False, ssl.CERT_NONE


def connect(server, source: str) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(source, 0))
    return TLS.wrap_socket(s)


def status(server, source: str, request: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") -> bytes:
    with connect(server, source) as s:
        s.sendall(request)
        return s.recv(4096).split(b"\r\n")[0]


def gone(s: ssl.SSLSocket, deadline: float) -> bool:
    """The peer closed S (EOF or reset) before DEADLINE (monotonic); what it sent is skipped."""
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not s.recv(4096):
                return True
        except socket.timeout:
            return False
        except (OSError, ssl.SSLError):
            return True
    return False


def test_idle_tls_connections_from_many_addresses_do_not_shut_out_another(door):
    held = [connect(door, f"127.0.0.{a}") for a in range(2, 10) for _ in range(front.PER_ADDRESS)]
    t0 = time.monotonic()
    assert status(door, "127.0.0.100") == b"HTTP/1.1 200 OK"
    assert time.monotonic() - t0 < 2
    deadline = time.monotonic() + DEADLINE + front.SSL_SHUTDOWN_SECONDS + 2
    assert all(gone(s, deadline) for s in held)       # even though none of them reads or answers
    while door.slots.held and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not door.slots.held and not door.server_state.connections
    for s in held:
        s.close()


def test_the_cap_counts_only_connections_not_answered_yet(door, caplog):
    answered = []
    for _ in range(front.PER_ADDRESS + 4):             # keep-alive connections, each answered once
        s = connect(door, "127.0.0.20")
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        answered.append(s)
    idle = [connect(door, "127.0.0.20") for _ in range(front.PER_ADDRESS)]
    with pytest.raises((OSError, ssl.SSLError)):       # the cap: the next one is refused at accept
        status(door, "127.0.0.20")
    assert door.servers[0].refused >= 1
    warned = [r.getMessage() for r in caplog.records if r.name == "ztgate.enroll"]
    assert any("127.0.0.20" in m and f"holds {front.PER_ADDRESS}" in m for m in warned), warned
    for s in answered + idle:
        s.close()


def test_a_connection_cut_at_the_deadline_is_answered_408(door):
    with connect(door, "127.0.0.30") as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        s.settimeout(DEADLINE + 3)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout") and b"within 2 s" in answer


def test_a_long_body_gets_time_by_its_length(door):
    with connect(door, "127.0.0.31") as s:
        length = 3 * front.BODY_RATE                   # 3 s more at the slowest rate allowed
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length)
        time.sleep(DEADLINE + 1)
        s.sendall(b"x" * length)
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_host_name_listens_on_each_of_its_addresses():
    assert front.listen_addresses("127.0.0.1", 8443) == [(socket.AF_INET, ("127.0.0.1", 8443))]
    assert front.listen_addresses("::1", 8443) == [(socket.AF_INET6, ("::1", 8443))]
    named = front.listen_addresses("localhost", 8443)
    resolved = {a[4][0] for a in socket.getaddrinfo("localhost", 8443, type=socket.SOCK_STREAM)}
    assert {address[0] for _, address in named} == resolved and len(named) == len(resolved)
