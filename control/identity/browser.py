"""The enrollment page (IDENTITY.md, "GET /"): a person logs in with the IdP and enrolls a
phone or a laptop without a command line.

    GET /          the page: "log in", or (logged in) a form naming the device
    GET /login     starts the authorization code flow: PKCE (S256), state and nonce
    GET /callback  the IdP's redirect: the state is used once and must be this browser's
                   (a cookie holds it), the code is exchanged with the verifier, and the ID
                   token checked (nonce included) like any other
    POST /enroll   (form, CSRF token of the login) the gateway makes the key pair, enrolls
                   the public key, and shows the configuration once, as text and a QR code;
                   the private key is in that answer only (Cache-Control: no-store)

Pending logins and logged-in browsers live in memory for LOGIN_SECONDS (a restart logs
everyone out of the page; enrolled devices are the store's).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import threading
import time
from typing import Optional
from urllib.parse import urlencode

import httpx
import qrcode
import qrcode.image.svg
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import wireguard
from ..files import DEVICE_NAME
from .http import Refusal, client_key, log
from .tokens import Identity

LOGIN_SECONDS = 600          # a pending login, and a logged-in page, last this long
MAX_PENDING = 10_000         # pending logins and page sessions kept at most (the oldest go first)
PER_CLIENT = 100             # of which one client address (an IPv6 /64) holds at most (its oldest go first)
STATE_COOKIE, SESSION_COOKIE = "ztgate_login", "ztgate_page"
HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                      "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"}
STYLE = ("body{font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em}"
         "pre{background:#f4f4f4;padding:1em;overflow-x:auto}svg{width:18em;height:18em}")


class Expiring:
    """key -> value for LOGIN_SECONDS, at most MAX_PENDING of them, at most PER_CLIENT of one
    client's (so that one client's requests cannot push out everybody else's); thread-safe."""

    def __init__(self, most: int = MAX_PENDING, per_client: int = PER_CLIENT):
        self.most, self.per_client = most, per_client
        self.lock = threading.Lock()
        self.items: dict[str, tuple[float, object, str]] = {}      # key -> (until, value, client)
        self.of_client: dict[str, list[str]] = {}                   # client -> its keys, oldest first

    def put(self, value, client: str = "") -> str:
        key = secrets.token_urlsafe(32)
        client = client_key(client)
        with self.lock:
            now = time.monotonic()
            mine = [k for k in self.of_client.get(client, []) if k in self.items]
            while len(mine) >= self.per_client:
                self.items.pop(mine.pop(0), None)
            if len(self.items) >= self.most:
                self.items = {k: v for k, v in self.items.items() if v[0] > now}
                self.of_client = {c: [k for k in keys if k in self.items] for c, keys in self.of_client.items()}
                self.of_client = {c: keys for c, keys in self.of_client.items() if keys}
                mine = self.of_client.get(client, [])
            while len(self.items) >= self.most:
                self.items.pop(next(iter(self.items)))
            self.items[key] = (now + LOGIN_SECONDS, value, client)
            self.of_client[client] = mine + [key]
        return key

    def get(self, key: Optional[str], pop: bool = False):
        with self.lock:
            found = (self.items.pop if pop else self.items.get)(key or "", None)
            if pop and found:
                keys = self.of_client.get(found[2], [])
                if key in keys:
                    keys.remove(key)
                if not keys:
                    self.of_client.pop(found[2], None)
        return found[1] if found and found[0] > time.monotonic() else None

    def __len__(self) -> int:
        return len(self.items)


class Logins:
    def __init__(self):
        self.pending = Expiring()     # state -> (code verifier, nonce, redirect URI)
        self.pages = Expiring()       # page session -> (Identity, CSRF token)


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
                        f"<meta name=viewport content='width=device-width'><style>{STYLE}</style></head>"
                        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>", status_code=status,
                        headers=HEADERS)


def error_page(status: int, message: str) -> HTMLResponse:
    return page("ztgate: refused", f"<p id=error>{html.escape(message)}</p><p><a href='/'>Start again</a></p>", status)


def set_cookie(response: Response, name: str, value: str) -> None:
    response.set_cookie(name, value, max_age=LOGIN_SECONDS, path="/", secure=True, httponly=True, samesite="lax")


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


def redirect_uri(request: Request) -> str:
    base = request.app.state.service.cfg.public_url or str(request.base_url).rstrip("/")
    return base + "/callback"


async def home(request: Request) -> Response:
    svc = request.app.state.service
    logged = svc.logins.pages.get(request.cookies.get(SESSION_COOKIE))
    if logged is None:
        return page("ztgate: enroll a device", "<p>Log in with your organisation's account to give this "
                    "phone or laptop access.</p><p><a id=login href='/login'>Log in</a></p>")
    who, csrf = logged
    return page("ztgate: enroll a device", f"<p>Logged in as <b id=who>{html.escape(who.email)}</b>.</p>"
                "<form method=post action='/enroll'>"
                f"<input type=hidden name=csrf value='{html.escape(csrf)}'>"
                "<label>Device name <input name=name id=name required pattern='[a-z0-9][a-z0-9._\\-]{0,62}' "
                "placeholder='alice-phone'></label> <button id=enroll>Enroll</button></form>"
                "<p>The gateway makes this device's key and shows its configuration once: import it into "
                "the WireGuard app (scan the QR code) or save it for wg-quick.</p>")


async def login(request: Request) -> Response:
    svc = request.app.state.service
    meta = await svc_discovery(svc)
    verifier, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(24)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    back = redirect_uri(request)
    state = svc.logins.pending.put((verifier, nonce, back), client_of(request))
    scopes = ["openid", "email", "profile"] + (["groups"] if "groups" in meta.get("scopes_supported", []) else [])
    query = urlencode({"response_type": "code", "client_id": svc.cfg.client_id, "redirect_uri": back,
                       "scope": " ".join(scopes), "state": state, "nonce": nonce, "code_challenge": challenge,
                       "code_challenge_method": "S256"})
    response = RedirectResponse(f"{meta['authorization_endpoint']}?{query}", status_code=302, headers=HEADERS)
    set_cookie(response, STATE_COOKIE, state)
    return response


async def svc_discovery(svc) -> dict:
    from .tokens import ProviderUnavailable
    try:
        meta = await run_in_threadpool(svc.verifier.provider.discovery)
    except ProviderUnavailable as e:
        raise Refusal(503, f"the identity provider cannot be reached: {e}", html=True) from None
    for key in ("authorization_endpoint", "token_endpoint"):
        if not isinstance(meta.get(key), str):
            raise Refusal(503, f"the identity provider's discovery names no {key}", html=True)
    return meta


async def callback(request: Request) -> Response:
    svc = request.app.state.service
    q = request.query_params
    if "error" in q:
        raise Refusal(401, f"the identity provider refused the login: {q['error']} {q.get('error_description', '')}",
                      html=True)
    state = q.get("state", "")
    pending = svc.logins.pending.get(state, pop=True)        # used once, whatever follows
    if pending is None:
        raise Refusal(400, "state: unknown, expired or already used: log in again", html=True)
    if not hmac.compare_digest(request.cookies.get(STATE_COOKIE, "").encode(), state.encode()):
        raise Refusal(400, "state: this login was started in another browser: log in again", html=True)
    verifier, nonce, back = pending
    meta = await svc_discovery(svc)
    id_token = await run_in_threadpool(exchange, svc, meta, q.get("code", ""), verifier, back)
    try:
        who = await svc.identity_of(id_token, nonce)
    except Refusal as e:
        raise Refusal(e.status, str(e), html=True) from None
    response = RedirectResponse("/", status_code=303, headers=HEADERS)
    set_cookie(response, SESSION_COOKIE, svc.logins.pages.put((who, secrets.token_urlsafe(32)), client_of(request)))
    response.delete_cookie(STATE_COOKIE, path="/")
    return response


def exchange(svc, meta: dict, code: str, verifier: str, back: str) -> str:
    """The ID token the token endpoint gives for CODE (with the PKCE verifier)."""
    if not code or len(code) > 4096:
        raise Refusal(400, "code: missing from the identity provider's redirect", html=True)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": back, "code_verifier": verifier,
            "client_id": svc.cfg.client_id}
    auth = None
    if svc.client_secret:
        methods = meta.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
        if "client_secret_basic" in methods:
            auth = (svc.cfg.client_id, svc.client_secret)
        else:
            form["client_secret"] = svc.client_secret
    try:
        r = svc.verifier.provider.client.post(meta["token_endpoint"], data=form, auth=auth)
        body = r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise Refusal(502, f"the identity provider's token endpoint failed: {e}", html=True) from None
    if r.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("id_token"), str):
        detail = body.get("error", r.status_code) if isinstance(body, dict) else r.status_code
        raise Refusal(401, f"the identity provider did not give an ID token: {detail}", html=True)
    return body["id_token"]


async def enroll(request: Request) -> Response:
    svc = request.app.state.service
    logged = svc.logins.pages.get(request.cookies.get(SESSION_COOKIE))
    if logged is None:
        raise Refusal(401, "not logged in (or the login is over): log in again", html=True)
    who, csrf = logged
    form = await request.form(max_files=0, max_fields=4)
    if not hmac.compare_digest(str(form.get("csrf", "")).encode(), csrf.encode()):
        raise Refusal(403, "csrf: this form was not the gateway's page: reload it", html=True)
    name = str(form.get("name", ""))
    if not DEVICE_NAME.match(name):
        raise Refusal(400, f"name {name[:80]!r}: a device name matches [a-z0-9][a-z0-9._-]{{0,62}}", html=True)
    private, public = wireguard.generate_keypair()
    try:
        out = await run_in_threadpool(svc.gateway_call, "login", issuer=who.issuer, subject=who.subject,
                                      email=who.email, provider_groups=list(who.groups), device=name,
                                      public_key=public, session_seconds=svc.cfg.session, issued_at=who.issued_at)
    except Refusal as e:
        raise Refusal(e.status, str(e), html=True) from None
    config = out["config"].replace("[Interface]\n", f"[Interface]\nPrivateKey = {private}\n", 1)
    log.info("page: %s enrolled %s", who.email, name)
    return shown_once(who, out, config)


def shown_once(who: Identity, out: dict, config: str) -> HTMLResponse:
    svg = qrcode.make(config, image_factory=qrcode.image.svg.SvgPathImage).to_string(encoding="unicode")
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(out["session_expires"]))
    return page(f"ztgate: {out['device']} enrolled",
                f"<p>Device <b>{html.escape(out['device'])}</b> of {html.escape(who.email)}, addresses "
                f"{html.escape(', '.join(out['addresses']))}; its session lasts until {expires}.</p>"
                "<p><b>This configuration holds the device's private key and is shown only now.</b> Scan it "
                "with the WireGuard app, or save it as <code>ztgate.conf</code> for wg-quick.</p>"
                f"<div id=qr>{svg}</div><pre id=config>{html.escape(config)}</pre>")


ROUTES = [Route("/", home, methods=["GET"]), Route("/login", login, methods=["GET"]),
          Route("/callback", callback, methods=["GET"]), Route("/enroll", enroll, methods=["POST"])]
