"""The device's side of enrollment (IDENTITY.md, "The device's side"): `ztgate login`.

The key pair is made here and the private key never leaves the device. The gateway names
its IdP (GET /v1/oidc); an ID token comes from that IdP by the device authorization grant
(RFC 8628: the person approves on any browser) where the IdP offers it, otherwise by the
authorization code flow with PKCE and a loopback redirect (RFC 8252: the person opens the
printed URL on this machine). The token enrolls the public key (POST /v1/devices), and the
wg-quick configuration, with the private key, is written mode 0600. Run again with the same
file, the same key renews the session.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import os
import re
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt

from .. import wireguard
from ..errors import InputError, ZtError
from ..files import DEVICE_NAME

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SCOPES = "openid email profile"
WAIT_SECONDS = 600          # for the person to approve or log in


def trust(ca_file: Optional[str]) -> ssl.SSLContext:
    """The system's CAs, and CA_FILE's too (the gateway's and, in the lab, the IdP's)."""
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise InputError(f"--ca {ca_file}: {e}") from None
    return ctx


def default_name() -> str:
    """This host's name as a device name (lowercase, [a-z0-9._-])."""
    name = re.sub(r"[^a-z0-9._-]", "-", socket.gethostname().lower()).strip("-._")[:63]
    return name or "device"


class Login:
    def __init__(self, gateway: str, ca_file: Optional[str], say: Callable[[str], None]):
        if not gateway.startswith("https://"):
            raise InputError(f"--gateway {gateway!r}: the enrollment service's https:// URL")
        self.gateway = gateway.rstrip("/")
        self.say = say
        self.http = httpx.Client(verify=trust(ca_file), timeout=30, follow_redirects=False)

    def _json(self, r: httpx.Response, what: str) -> dict:
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code >= 400:
            why = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            raise ZtError(f"{what}: {r.status_code} {why or r.text[:200]}")
        if not isinstance(body, dict):
            raise ZtError(f"{what}: not a JSON object")
        return body

    def get(self, url: str, what: str) -> dict:
        try:
            return self._json(self.http.get(url), what)
        except httpx.HTTPError as e:
            raise ZtError(f"{what}: cannot reach {url}: {e}") from None

    def post(self, url: str, what: str, **kw) -> dict:
        try:
            return self._json(self.http.post(url, **kw), what)
        except httpx.HTTPError as e:
            raise ZtError(f"{what}: cannot reach {url}: {e}") from None

    # the ID token ---------------------------------------------------------------------------

    def id_token(self, flow: str = "auto") -> str:
        oidc = self.get(f"{self.gateway}/v1/oidc", "the gateway")
        meta = self.get(oidc["issuer"].rstrip("/") + "/.well-known/openid-configuration", "the identity provider")
        if flow == "device" or flow == "auto" and meta.get("device_authorization_endpoint"):
            if not meta.get("device_authorization_endpoint"):
                raise ZtError("the identity provider offers no device authorization grant: use --flow code")
            return self.device_grant(meta, oidc["client_id"])
        return self.code_flow(meta, oidc["client_id"])

    def device_grant(self, meta: dict, client_id: str) -> str:
        start = self.post(meta["device_authorization_endpoint"], "device authorization",
                          data={"client_id": client_id, "scope": SCOPES})
        where = start.get("verification_uri_complete") or start.get("verification_uri")
        self.say(f"To log in, open {where} and enter the code {start['user_code']}")
        interval = int(start.get("interval", 5))
        deadline = time.monotonic() + min(WAIT_SECONDS, int(start.get("expires_in", WAIT_SECONDS)))
        while time.monotonic() < deadline:
            time.sleep(interval)
            r = self.http.post(meta["token_endpoint"], data={"grant_type": DEVICE_GRANT, "client_id": client_id,
                                                             "device_code": start["device_code"]})
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code == 200 and isinstance(body.get("id_token"), str):
                return body["id_token"]
            error = body.get("error")
            if error == "slow_down":
                interval += 5
            elif error != "authorization_pending":
                raise ZtError(f"the identity provider refused the login: {error or r.status_code} "
                              f"{body.get('error_description', '')}".rstrip())
        raise ZtError("the login was not approved in time: run ztgate login again")

    def code_flow(self, meta: dict, client_id: str) -> str:
        verifier, state, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        got: dict = {}
        done = threading.Event()

        class Redirect(http.server.BaseHTTPRequestHandler):
            def do_GET(self):               # noqa: N802 (the stdlib's name)
                query = parse_qs(urlsplit(self.path).query)
                if urlsplit(self.path).path == "/callback" and not done.is_set():
                    got.update({k: v[0] for k, v in query.items()})
                    done.set()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.end_headers()
                self.wfile.write(b"ztgate: you may close this page and return to the terminal.\n")

            def log_message(self, *args):
                pass
        server = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        back = f"http://127.0.0.1:{server.server_address[1]}/callback"
        try:
            query = urlencode({"response_type": "code", "client_id": client_id, "redirect_uri": back,
                               "scope": SCOPES, "state": state, "nonce": nonce, "code_challenge": challenge,
                               "code_challenge_method": "S256"})
            self.say(f"To log in, open this URL in a browser on this machine:\n{meta['authorization_endpoint']}?{query}")
            if not done.wait(WAIT_SECONDS):
                raise ZtError("no login came back in time: run ztgate login again")
        finally:
            server.shutdown()
        if got.get("state") != state:
            raise ZtError("the login's state does not match: run ztgate login again")
        if "code" not in got:
            raise ZtError(f"the identity provider refused the login: {got.get('error', 'no code')}")
        body = self.post(meta["token_endpoint"], "the identity provider's token endpoint",
                         data={"grant_type": "authorization_code", "code": got["code"], "redirect_uri": back,
                               "client_id": client_id, "code_verifier": verifier})
        token = body.get("id_token")
        # The gateway checks the token; the nonce says it is the answer to this login.
        if not isinstance(token, str) or jwt.decode(token, options={"verify_signature": False}).get("nonce") != nonce:
            raise ZtError("the identity provider gave no ID token for this login")
        return token

    # enrollment -----------------------------------------------------------------------------

    def enroll(self, token: str, name: str, config: Path) -> dict:
        """Enroll (or renew) NAME with the key of CONFIG, made now if CONFIG has none; write CONFIG."""
        if not DEVICE_NAME.match(name):
            raise InputError(f"--name {name!r}: a device name matches [a-z0-9][a-z0-9._-]{{0,62}}")
        private = existing_key(config) or wireguard.generate_keypair()[0]
        try:
            r = self.http.post(f"{self.gateway}/v1/devices", headers={"Authorization": f"Bearer {token}"},
                               json={"name": name, "public_key": wireguard.public_key_of(private)})
        except httpx.HTTPError as e:
            raise ZtError(f"the gateway: cannot reach {self.gateway}: {e}") from None
        answer = self._json(r, "the gateway refused the enrollment")
        text = answer["config"].replace("[Interface]\n", f"[Interface]\nPrivateKey = {private}\n", 1)
        write_private(config, text)
        return dict(answer, renewed=r.status_code == 200)


def existing_key(config: Path) -> Optional[str]:
    """The private key of a configuration written by an earlier login, if there is one."""
    try:
        m = re.search(r"^PrivateKey\s*=\s*(\S+)\s*$", config.read_text(), re.M)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InputError(f"{config}: cannot read: {e.strerror}") from None
    return m.group(1) if m else None


def write_private(path: Path, text: str) -> None:
    """TEXT to PATH, mode 0600 from the start (it holds the private key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
