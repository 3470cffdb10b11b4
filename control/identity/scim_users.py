"""SCIM 2.0 Users (see scim.py): the IdP creates, replaces, (de)activates and deletes users.

A user's userName is its email (rules name emails): an IdP whose userName is not an email
(Entra's UPN, say) must send the email as the primary of `emails`. `active: false` ends every
session of the user and its open flows at once (sessions.py); DELETE removes it with its
devices. Other attributes (name, phone numbers...) are accepted and not kept.
"""
from __future__ import annotations

import uuid
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..model import fold
from .http import Refusal, json_body
from .scim import page, parse_filter, patch_operations, scim_json, service_of

USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def user_resource(request: Request, u) -> dict:
    out = {"schemas": [USER], "id": u.scim_id, "userName": u.email, "active": u.active,
           "emails": [{"value": u.email, "primary": True, "type": "work"}],
           "groups": [{"display": g} for g in u.provider_groups],
           "meta": {"resourceType": "User", "location": str(request.url_for("scim_user", uid=u.scim_id))}}
    if u.external_id:
        out["externalId"] = u.external_id
    return out


def scim_users(svc) -> list:
    return [u for u in svc.gateway.identities.users if u.scim_id]


def known_user(svc, request: Request):
    uid = request.path_params["uid"]
    for u in scim_users(svc):
        if u.scim_id == uid:
            return u
    raise Refusal(404, f"no user with id {uid!r}")


def boolean(value: Any, what: str) -> bool:
    """SCIM's booleans; Entra ID sends "True" and "False" as strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise Refusal(400, f"{what}: true or false, got {str(value)[:80]!r}", scim_type="invalidValue")


def email_of(body: dict) -> str:
    """userName when it is an email, else the primary (or only) email of `emails`."""
    name = body.get("userName")
    if isinstance(name, str) and "@" in name:
        return name
    emails = body.get("emails")
    if isinstance(emails, list):
        chosen = [e for e in emails if isinstance(e, dict) and e.get("primary") is True] or emails[:1]
        if chosen and isinstance(chosen[0], dict) and isinstance(chosen[0].get("value"), str):
            return chosen[0]["value"]
    raise Refusal(400, "userName (or the primary of emails) must be the user's email address",
                  scim_type="invalidValue")


def external_id_of(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str) and value:
        return value
    raise Refusal(400, "externalId: a non-empty string", scim_type="invalidValue")


async def users(request: Request) -> Response:
    svc = service_of(request)
    if request.method == "GET":
        chosen = parse_filter(request, {"username": "userName", "externalid": "externalId", "id": "id",
                                        "emails.value": "emails.value"})

        def matches(u) -> bool:
            if chosen is None:
                return True
            attr, value = chosen
            if attr == "id":
                return u.scim_id == value
            if attr == "externalId":
                return u.external_id == value
            return u.key == fold(value)
        return page(request, [user_resource(request, u) for u in scim_users(svc) if matches(u)])
    body = await json_body(request)
    if not isinstance(body, dict):
        raise Refusal(400, "a user is a JSON object", scim_type="invalidSyntax")
    email = email_of(body)
    found = svc.gateway.identities.find_user(email)
    if found is not None and found.scim_id:
        raise Refusal(409, f"user {email!r} exists already (id {found.scim_id})", scim_type="uniqueness")
    scim_id = str(uuid.uuid4())
    await run_in_threadpool(svc.gateway_call, "scim_user", scim_id=scim_id, email=email,
                            external_id=external_id_of(body.get("externalId")),
                            active=boolean(body.get("active", True), "active"))
    return scim_json(user_resource(request, known_user_by_id(svc, scim_id)), 201)


def known_user_by_id(svc, scim_id: str):
    return next(u for u in scim_users(svc) if u.scim_id == scim_id)


async def user(request: Request) -> Response:
    svc = service_of(request)
    u = known_user(svc, request)
    if request.method == "GET":
        return scim_json(user_resource(request, u))
    if request.method == "DELETE":
        await run_in_threadpool(svc.gateway_call, "scim_user_delete", scim_id=u.scim_id)
        return Response(status_code=204)
    body = await json_body(request)
    if request.method == "PUT":
        if not isinstance(body, dict):
            raise Refusal(400, "a user is a JSON object", scim_type="invalidSyntax")
        email, external_id = email_of(body), external_id_of(body.get("externalId"))
        active = boolean(body.get("active", True), "active")
    else:
        email, external_id, active = patched_user(patch_operations(body), u)
    await run_in_threadpool(svc.gateway_call, "scim_user", scim_id=u.scim_id, email=email,
                            external_id=external_id, active=active)
    return scim_json(user_resource(request, known_user_by_id(svc, u.scim_id)))


def patched_user(operations: list[dict], u) -> tuple[str, Optional[str], bool]:
    """(email, externalId, active) once OPERATIONS are done; other attributes are not kept."""
    email, external_id, active = u.email, u.external_id, u.active
    for op in operations:
        kind, path, value = str(op["op"]).lower(), op.get("path"), op.get("value")
        changes = value if path is None and isinstance(value, dict) else {str(path): value}
        for attr, v in changes.items():
            attr = attr.lower()
            if attr == "active":
                if kind == "remove":
                    raise Refusal(400, "active cannot be removed: replace it with true or false",
                                  scim_type="mutability")
                active = boolean(v, "active")
            elif attr == "externalid":
                external_id = None if kind == "remove" else external_id_of(v)
            elif attr == "username":
                email = email_of({"userName": v}) if kind != "remove" else email
    return email, external_id, active


ROUTES = [
    Route("/scim/v2/Users", users, methods=["GET", "POST"]),
    Route("/scim/v2/Users/{uid}", user, methods=["GET", "PUT", "PATCH", "DELETE"], name="scim_user"),
]
