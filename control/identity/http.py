"""What every route of the enrollment service shares: bounded requests (size: 413, rate per
client address: 429, as a pure ASGI middleware in front of the app), JSON bodies read and
checked, and refusals as JSON.

A refusal is raised as Refusal(status, message) anywhere in a route and answered as
{"error": message} (SCIM routes answer in SCIM's error schema, see scim.py). Nothing is
changed before a request is whole and valid: routes read and check the body first, and the
gateway's operations validate before they commit.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("ztgate.enroll")

MAX_BODY = 256 << 10          # bytes: a SCIM group of a few thousand members; a device is ~100
RATE = 20.0                   # requests a second per client address, sustained (identity.rate_limit)
BURST = 60                    # and at once
MAX_CLIENTS = 10_000          # rate buckets kept; idle ones are forgotten first


class Refusal(Exception):
    """Answer STATUS with MESSAGE; nothing was changed."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.extra = extra


class BodyTooLarge(Exception):
    pass


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers,
                        media_type="application/json")


async def json_body(request: Request, empty_ok: bool = False) -> Any:
    """The request's JSON (Refusal 400 when it is not; 413 comes from Limits)."""
    body = await request.body()
    if not body and empty_ok:
        return {}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refusal(400, f"the body is not JSON: {e}") from None


def client_key(address: str) -> str:
    """Whom limits count a client address as: an IPv4 address, or an IPv6 /64 (one host is
    given a whole /64, and may take any address of it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


def bearer(request: Request) -> str:
    """The token of `Authorization: Bearer TOKEN`, or ''."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Buckets:
    """A token bucket per client address (per client_key: an IPv6 /64 is one client)."""

    def __init__(self, rate: float = RATE, burst: int = BURST):
        self.rate, self.burst = rate, burst
        self.lock = threading.Lock()
        self.buckets: dict[str, tuple[float, float]] = {}   # address -> (tokens, when)

    def take(self, client: str) -> float:
        """0 when CLIENT may go on now, else the seconds until it may."""
        now = time.monotonic()
        client = client_key(client)
        with self.lock:
            tokens, when = self.buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if len(self.buckets) >= MAX_CLIENTS and client not in self.buckets:
                self._forget_idle(now)
            if tokens < 1:
                self.buckets[client] = (tokens, now)
                return (1 - tokens) / self.rate
            self.buckets[client] = (tokens - 1, now)
            return 0.0

    def _forget_idle(self, now: float) -> None:
        full = now - self.burst / self.rate
        self.buckets = {c: tw for c, tw in self.buckets.items() if tw[1] > full}
        if len(self.buckets) >= MAX_CLIENTS:        # all busy: the oldest half goes
            keep = sorted(self.buckets.items(), key=lambda kv: kv[1][1])[MAX_CLIENTS // 2:]
            self.buckets = dict(keep)


class Limits:
    """ASGI middleware: a client over its rate gets 429, a body over MAX_BODY 413 (by its
    Content-Length before anything is read, or as it streams in)."""

    def __init__(self, app, rate: float = RATE, burst: int = BURST, max_body: int = MAX_BODY):
        self.app = app
        self.buckets = Buckets(rate, burst)
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        wait = self.buckets.take(client)
        if wait:
            return await error(429, f"too many requests from {client}: at most {self.buckets.rate:g} a second",
                               {"Retry-After": str(max(1, round(wait)))})(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        got = 0
        started = False

        async def counted():
            nonlocal got
            message = await receive()
            got += len(message.get("body", b""))
            if got > self.max_body:
                raise BodyTooLarge()
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        await error(413, f"the request's body is larger than {self.max_body} bytes")(scope, receive, send)
