"""`python -m lab.idp serve`: the provider as its own process. HTTPS (werkzeug's threaded
server, TLS from the standard library's ssl) on --listen, the admin channel (HTTP over the
Unix socket STATE/admin.sock, 0600) beside it. Without --tls-cert, the provider makes its own
CA in STATE (ca.pem, ca.key) and a certificate for the listen address. Once both listen it
writes STATE/issuer (the issuer URL; a port of 0 becomes the real one) and says so on stdout;
SIGTERM or SIGINT stop it, removing the socket and that file.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from werkzeug.serving import make_server

from . import pki
from .admin import create_admin_app
from .provider import Provider
from .scim import ScimTarget
from .web import create_app


@dataclass
class Settings:
    listen: str                                  # HOST:PORT ([v6]:PORT); PORT 0: any free port
    state: Path
    issuer: Optional[str] = None                 # default https://HOST:PORT
    users_file: Optional[Path] = None
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    client_id: str = "ztgate"
    redirect_prefixes: tuple[str, ...] = ()
    id_token_ttl: int = 600
    alg: str = "RS256"
    scim: Optional[ScimTarget] = None
    admin_socket: Optional[Path] = None          # default STATE/admin.sock


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _url_host(host: str) -> str:
    return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host


def tls_context(s: Settings, host: str) -> ssl.SSLContext:
    cert, key = s.tls_cert, s.tls_key
    if cert is None:
        pki.make_ca(s.state / "ca.pem", s.state / "ca.key", name="ztgate test IdP CA")
        cert, key = s.state / "tls.pem", s.state / "tls.key"
        pki.issue(s.state / "ca.pem", s.state / "ca.key", cert, key, [host])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def serve(s: Settings) -> int:
    os.umask(0o077)                              # the admin socket and the state: root's only
    s.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = split_listen(s.listen)
    web = make_server(host, port, None, threaded=True, ssl_context=tls_context(s, host))
    issuer = s.issuer or f"https://{_url_host(host)}:{web.server_port}"
    provider = Provider(issuer, s.state, s.users_file, s.client_id, s.redirect_prefixes, s.id_token_ttl, s.alg)
    web.app = create_app(provider)
    sock = s.admin_socket or s.state / "admin.sock"
    admin = make_server(f"unix://{sock}", 0, create_admin_app(provider, s.scim), threaded=True)
    os.chmod(sock, 0o600)
    for server in (web, admin):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    (s.state / "issuer").write_text(issuer + "\n")
    print(f"idp up: issuer {issuer}, admin {sock}, keys {', '.join(provider.keys.kids())}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for server in (web, admin):
        server.shutdown()
        server.server_close()
    sock.unlink(missing_ok=True)
    (s.state / "issuer").unlink(missing_ok=True)
    print("idp stopped", flush=True)
    return 0
