"""The enrollment service: HTTPS beside the gateway daemon's threads (IDENTITY.md).

Starlette routes (devices.py: the API; browser.py: the page; scim.py: SCIM 2.0) behind
http.Limits (size, rate), served by uvicorn with its own TLS in one thread of the daemon,
with its own event loop. Token checks and the gateway's operations block (the IdP's keys may
be fetched; the gateway holds its lock while it commits), so they run in Starlette's thread
pool, never on the loop.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
from pathlib import Path
from typing import Optional

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..config import Config
from ..errors import InputError, ZtError
from ..gateway.sessions import SessionRefused
from . import browser, devices, scim, scim_users
from .front import GatedServer
from .http import BodyTooLarge, Limits, Refusal, error, log
from .tokens import Identity, ProviderUnavailable, TokenRefused, Verifier

START_SECONDS = 10        # uvicorn binds and loads its certificate in well under this


class EnrollmentService:
    def __init__(self, config: Config, gateway, verifier: Optional[Verifier] = None):
        self.config = config
        self.cfg = config.identity
        self.gateway = gateway
        self.uid = os.getuid()        # audit rows of the IdP's changes: the daemon's own uid
        self.verifier = verifier or Verifier(self.cfg)
        self.client_secret = read_secret(self.cfg.client_secret_file, "client_secret_file")
        self.scim_token = read_secret(self.cfg.scim_token_file, "scim_token_file")
        self.scim_groups = scim.GroupNames(Path(config.state_dir) / "scim-groups.json")
        self.logins = browser.Logins()
        routes = devices.ROUTES + browser.ROUTES + (scim_users.ROUTES + scim.ROUTES if self.scim_token else [])
        app = Starlette(routes=routes, exception_handlers={
            Refusal: on_refusal, BodyTooLarge: on_too_large, HTTPException: on_http, Exception: on_crash})
        app.state.service = self
        self.app = Limits(app, rate=self.cfg.rate_limit, burst=3 * self.cfg.rate_limit)
        host, port = self.cfg.listen_address
        self.uvicorn = uvicorn.Config(self.app, host=host, port=port, ssl_certfile=str(self.cfg.tls_cert),
                                      ssl_keyfile=str(self.cfg.tls_key), log_level="warning", access_log=False,
                                      proxy_headers=False, server_header=False, timeout_keep_alive=15,
                                      limit_concurrency=None, h11_max_incomplete_event_size=16 << 10)
        try:
            self.uvicorn.load()       # the certificate and key now: a bad one stops the daemon with its name
        except (OSError, ValueError) as e:
            raise InputError(f"{config.source}: identity.tls_cert / identity.tls_key "
                             f"({self.cfg.tls_cert}, {self.cfg.tls_key}): cannot be loaded: {e}") from None
        self.server = GatedServer(self.uvicorn)     # uvicorn behind front.py's door (deadlines, per-address cap)
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        t0 = time.monotonic()
        self.thread = threading.Thread(target=self._serve, name="enroll", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ZtError(f"the enrollment service could not listen on {self.cfg.listen} (see the log)")
            time.sleep(0.01)
        log.info("enrollment service on https://%s (listening in %.0f ms)", self.cfg.listen,
                 1000 * (time.monotonic() - t0))

    def _serve(self) -> None:
        asyncio.run(self.server.serve())

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    # what the routes share ------------------------------------------------------------------

    async def identity_of(self, token: str, nonce: Optional[str] = None) -> Identity:
        """The user TOKEN proves; Refusal 401 (403: a user refused) naming the failed check."""
        try:
            return await run_in_threadpool(self.verifier.verify, token, nonce)
        except TokenRefused as e:
            raise Refusal(e.status, str(e)) from None
        except ProviderUnavailable as e:
            log.warning("%s", e)
            raise Refusal(503, f"the identity provider cannot be reached to check the token: {e}") from None

    def gateway_call(self, op: str, **args) -> dict:
        """A gateway operation (sessions.py) as the IdP's: its refusals become HTTP ones."""
        try:
            return getattr(self.gateway, op)(self.uid, **args)
        except SessionRefused as e:
            raise Refusal(e.status, str(e)) from None
        except InputError as e:
            raise Refusal(400, str(e)) from None
        except ZtError as e:
            log.error("%s: %s", op, e)
            raise Refusal(503, f"the gateway could not do it: {e}") from None

    def scim_allowed(self, request: Request) -> bool:
        """The SCIM bearer token, compared in constant time."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return bool(self.scim_token) and scheme.lower() == "bearer" and \
            hmac.compare_digest(token.strip().encode(), self.scim_token.encode())


def read_secret(path: Optional[Path], key: str) -> Optional[str]:
    if path is None:
        return None
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise InputError(f"identity.{key}: cannot read {path}: {e.strerror}") from None
    if not secret:
        raise InputError(f"identity.{key}: {path} is empty")
    return secret


async def on_refusal(request: Request, exc: Refusal):
    if request.url.path.startswith("/scim/"):
        return scim.scim_error(exc.status, str(exc), exc.extra.get("scim_type"))
    if exc.extra.get("html"):
        return browser.error_page(exc.status, str(exc))
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if exc.status == 401 else None
    return error(exc.status, str(exc), headers)


async def on_too_large(request: Request, exc: BodyTooLarge):
    return error(413, f"the request's body is larger than {request.app.state.service.app.max_body} bytes")


async def on_http(request: Request, exc: HTTPException):
    return error(exc.status_code, exc.detail or "refused", dict(exc.headers or {}))


async def on_crash(request: Request, exc: Exception):
    log.exception("enrollment service: %s %s", request.method, request.url.path)
    return error(500, "internal error (logged by the gateway)")
