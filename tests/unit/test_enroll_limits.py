"""The enrollment service's bounds (control/identity/http.py's Limits, in front of a Starlette
app that echoes the body's length): a client over its rate gets 429 with Retry-After, other
clients do not; a body over the limit gets 413, by its Content-Length or as it streams in."""
from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from control.identity.http import BodyTooLarge, Limits, client_key, error


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"length": len(await request.body())})


async def too_large(request, exc):
    return error(413, "too large")


class Client:
    """Requests into the ASGI app in this process (httpx's ASGI transport), from ADDRESS."""

    def __init__(self, app, address: str = "192.0.2.1"):
        self.app, self.address = app, address

    def post(self, path: str, content, headers=None) -> httpx.Response:
        async def send():
            transport = httpx.ASGITransport(self.app, client=(self.address, 50000))
            async with httpx.AsyncClient(transport=transport, base_url="https://enroll.test") as c:
                return await c.post(path, content=content, headers=headers)
        return asyncio.run(send())


def client(rate: float = 1000, burst: int = 1000, max_body: int = 1024) -> Client:
    app = Starlette(routes=[Route("/", echo, methods=["POST"])], exception_handlers={BodyTooLarge: too_large})
    return Client(Limits(app, rate=rate, burst=burst, max_body=max_body))


def test_rate_per_client_address():
    c = client(rate=1, burst=5)
    answers = [c.post("/", content=b"x").status_code for _ in range(8)]
    assert answers == [200] * 5 + [429] * 3
    r = c.post("/", content=b"x")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "too many requests" in r.json()["error"]
    other = Client(c.app, "192.0.2.2")
    assert other.post("/", content=b"x").status_code == 200


def test_body_size():
    c = client(max_body=1024)
    assert c.post("/", content=b"x" * 1024).json() == {"length": 1024}
    r = c.post("/", content=b"x" * 1025)
    assert r.status_code == 413 and "larger than 1024 bytes" in r.json()["error"]
    # no Content-Length (chunked): counted as it streams in
    async def chunks():
        yield b"x" * 600
        yield b"x" * 600
    streamed = c.post("/", content=chunks())
    assert streamed.status_code == 413
    assert c.post("/", content=b"1", headers={"Content-Length": "-1"}).status_code == 413


def test_an_ipv6_client_is_its_slash_64():
    """One host is given a whole /64: counting its addresses one by one would give it 2^64 buckets."""
    assert client_key("2001:db8:1:2::5") == client_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::5") != client_key("2001:db8:1:2::5")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    c = client(rate=1, burst=2)
    c.address = "2001:db8:1:2::1"
    assert [c.post("/", content=b"x").status_code for _ in range(2)] == [200, 200]
    c.address = "2001:db8:1:2::2"                   # the same /64: the same bucket
    assert c.post("/", content=b"x").status_code == 429
    c.address = "2001:db8:1:3::1"
    assert c.post("/", content=b"x").status_code == 200


def test_one_client_cannot_push_out_the_others_pending_logins():
    """The page's pending logins (GET /login) and page sessions: one client (an IPv6 /64) holds
    at most its share; its requests push out its own oldest, never another client's."""
    from control.identity.browser import Expiring
    logins = Expiring(most=50, per_client=10)
    theirs = logins.put("a person's login", "192.0.2.9")
    for i in range(1000):
        logins.put("flood", f"2001:db8::{i:x}")
    assert logins.get(theirs) == "a person's login" and len(logins) == 11
    used = logins.put("once", "203.0.113.1")
    assert logins.get(used, pop=True) == "once" and "203.0.113.1" not in logins.of_client
