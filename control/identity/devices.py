"""The enrollment API a device's client speaks (IDENTITY.md, "Enrollment service"):

    POST /v1/devices                 Bearer <ID token>  {"name", "public_key"}  -> 201 (200: renewed)
    POST /v1/devices/{name}/session  Bearer <ID token>                          -> 200
    GET  /v1/oidc                    the IdP a device logs in with: {"issuer", "client_id"}

Answers {"device", "addresses", "session_expires", "config"} where config is a wg-quick
configuration without its PrivateKey line. Refusals: 400 bad input, 401 a token that fails a
check (the body names it), 403 a user or device the gateway refuses, 404 no such device of
the user, 409 a name or key held by someone else.
"""
from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import wireguard
from ..errors import InputError
from ..files import DEVICE_NAME
from .http import Refusal, bearer, json_body
from .tokens import Identity


async def enroll(request: Request) -> JSONResponse:
    svc = request.app.state.service
    body = await json_body(request)
    if not isinstance(body, dict) or set(body) != {"name", "public_key"}:
        raise Refusal(400, 'the body is {"name": DEVICE, "public_key": BASE64 WIREGUARD KEY}, nothing else')
    name, key = check_name(body["name"]), body["public_key"]
    try:
        key = wireguard.check_public_key(key)
    except InputError as e:
        raise Refusal(400, f"public_key: {e}") from None
    who = await svc.identity_of(bearer(request))
    out = await run_in_threadpool(svc.gateway_call, "login", device=name, public_key=key, **login_args(svc, who))
    return JSONResponse(answer(out), status_code=201 if out.get("created") else 200)


async def renew(request: Request) -> JSONResponse:
    svc = request.app.state.service
    name = check_name(request.path_params["name"])
    body = await json_body(request, empty_ok=True)
    if body not in ({}, None):
        raise Refusal(400, "the body of a renewal is empty (or {}): the token says who renews")
    who = await svc.identity_of(bearer(request))
    out = await run_in_threadpool(svc.gateway_call, "renew", device=name, **login_args(svc, who))
    return JSONResponse(answer(out))


async def oidc(request: Request) -> JSONResponse:
    cfg = request.app.state.service.cfg
    return JSONResponse({"issuer": cfg.issuer, "client_id": cfg.client_id})


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not DEVICE_NAME.match(name):
        raise Refusal(400, f"name {str(name)[:80]!r}: a device name matches [a-z0-9][a-z0-9._-]{{0,62}}")
    return name


def login_args(svc, who: Identity) -> dict:
    return {"issuer": who.issuer, "subject": who.subject, "email": who.email, "provider_groups": list(who.groups),
            "session_seconds": svc.cfg.session, "issued_at": who.issued_at}


def answer(out: dict) -> dict:
    return {"device": out["device"], "user": out["user"], "addresses": out["addresses"],
            "session_expires": out["session_expires"], "config": out["config"]}


ROUTES = [Route("/v1/devices", enroll, methods=["POST"]),
          Route("/v1/devices/{name}/session", renew, methods=["POST"]),
          Route("/v1/oidc", oidc, methods=["GET"])]
