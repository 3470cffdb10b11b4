"""SCIM 2.0 (RFC 7643/7644), the subset identity providers push with: the IdP creates,
replaces, deactivates (`active: false`) and deletes users, and sets groups' members.

    /scim/v2/Users        POST, GET (filter=userName eq "..."), GET/PUT/PATCH/DELETE /{id}
    /scim/v2/Groups       POST, GET (filter=displayName eq "..."), GET/PUT/PATCH/DELETE /{id}

Users are the store's (sessions.py: scim_user, deprovision, scim_user_delete): a user's SCIM
id is the one this gateway gave it, its userName its email. A group's members are the users
whose provider groups hold its name (provider_group_members); the group's id and name are
kept in STATE_DIR/scim-groups.json, as nothing else knows a group without members.
Behind `Authorization: Bearer` with the token of scim_token_file. Errors are SCIM's
(urn:ietf:params:scim:api:messages:2.0:Error), with a detail that says what was wrong.
"""
from __future__ import annotations

import json
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InputError
from ..gateway.identities import check_groups
from .http import Refusal, json_body

ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
FILTER = re.compile(r'\s*([A-Za-z.]+)\s+eq\s+"((?:[^"\\]|\\.)*)"\s*\Z')
MEMBER_PATH = re.compile(r'\s*members\s*\[\s*value\s+eq\s+"((?:[^"\\]|\\.)*)"\s*\]\s*\Z', re.I)
MAX_PAGE = 1000


def scim_error(status: int, detail: str, scim_type: Optional[str] = None) -> JSONResponse:
    body = {"schemas": [ERROR], "status": str(status), "detail": detail}
    if scim_type:
        body["scimType"] = scim_type
    return JSONResponse(body, status_code=status, media_type="application/scim+json")


def scim_json(body: dict, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type="application/scim+json")


def service_of(request: Request):
    svc = request.app.state.service
    if not svc.scim_allowed(request):
        raise Refusal(401, "SCIM needs Authorization: Bearer <the token of identity.scim_token_file>")
    return svc


def parse_filter(request: Request, attributes: dict) -> Optional[tuple[str, str]]:
    """(attribute, value) of `filter=ATTR eq "VALUE"` (ATTR one of ATTRIBUTES, any case), or None."""
    text = request.query_params.get("filter")
    if text is None:
        return None
    m = FILTER.match(text)
    attr = attributes.get(m.group(1).lower()) if m else None
    if attr is None:
        raise Refusal(400, f"filter {text[:100]!r}: only {' or '.join(attributes.values())} eq \"...\"",
                      scim_type="invalidFilter")
    return attr, json.loads(f'"{m.group(2)}"')


def page(request: Request, resources: list) -> JSONResponse:
    try:
        start = max(1, int(request.query_params.get("startIndex", "1")))
        count = min(MAX_PAGE, max(0, int(request.query_params.get("count", str(MAX_PAGE)))))
    except ValueError:
        raise Refusal(400, "startIndex and count are integers", scim_type="invalidValue") from None
    chosen = resources[start - 1:start - 1 + count]
    return scim_json({"schemas": [LIST], "totalResults": len(resources), "startIndex": start,
                      "itemsPerPage": len(chosen), "Resources": chosen})


def patch_operations(body: Any) -> list[dict]:
    if not isinstance(body, dict) or not isinstance(body.get("Operations"), list) or not body["Operations"]:
        raise Refusal(400, 'a PATCH is {"schemas": ["' + PATCH + '"], "Operations": [...]}', scim_type="invalidSyntax")
    for op in body["Operations"]:
        if not isinstance(op, dict) or str(op.get("op", "")).lower() not in ("add", "remove", "replace"):
            raise Refusal(400, f"operation {str(op)[:100]}: op is add, remove or replace", scim_type="invalidSyntax")
    return body["Operations"]


# ---------------------------------------------------------------------------------------------
# groups


class GroupNames:
    """SCIM group id -> display name, kept in a small JSON file (written whole, atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.names: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def save(self, names: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(names, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
        self.names = names


def members_of(svc, name: str) -> list[dict]:
    return [{"value": u.scim_id, "display": u.email} for u in svc.gateway.identities.users
            if name in u.provider_groups and u.scim_id]


def group_resource(request: Request, svc, gid: str) -> dict:
    name = svc.scim_groups.names[gid]
    return {"schemas": [GROUP], "id": gid, "displayName": name, "members": members_of(svc, name),
            "meta": {"resourceType": "Group", "location": str(request.url_for("scim_group", gid=gid))}}


def emails_of(svc, members: Any) -> list[str]:
    """The emails of SCIM member references [{"value": USER ID}, ...]."""
    if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get("value"), str)
                                                for m in members):
        raise Refusal(400, 'members: a list of {"value": USER ID}', scim_type="invalidValue")
    by_id = {u.scim_id: u.email for u in svc.gateway.identities.users if u.scim_id}
    unknown = [m["value"] for m in members if m["value"] not in by_id]
    if unknown:
        raise Refusal(400, f"members: no user with id {unknown[0]!r}", scim_type="invalidValue")
    return [by_id[m["value"]] for m in members]


def check_name(name: Any) -> str:
    try:
        check_groups([name])
    except InputError as e:
        raise Refusal(400, f"displayName: {e}", scim_type="invalidValue") from None
    return name


def set_group(svc, gid: str, name: str, emails: list[str]) -> None:
    """Group GID is NAME with exactly these members (a renamed group's old name loses its members)."""
    with svc.scim_groups.lock:
        names = dict(svc.scim_groups.names)
        if any(n == name and g != gid for g, n in names.items()):
            raise Refusal(409, f"a group named {name!r} exists already", scim_type="uniqueness")
        old = names.get(gid)
        svc.gateway_call("provider_group_members", group=name, emails=emails)
        if old is not None and old != name:
            svc.gateway_call("provider_group_members", group=old, emails=[])
        names[gid] = name
        svc.scim_groups.save(names)


def drop_group(svc, gid: str) -> None:
    with svc.scim_groups.lock:
        names = dict(svc.scim_groups.names)
        svc.gateway_call("provider_group_members", group=names.pop(gid), emails=[])
        svc.scim_groups.save(names)


def known_group(svc, request: Request) -> str:
    gid = request.path_params["gid"]
    if gid not in svc.scim_groups.names:
        raise Refusal(404, f"no group with id {gid!r}", scim_type=None)
    return gid


async def groups(request: Request) -> Response:
    svc = service_of(request)
    if request.method == "GET":
        chosen = parse_filter(request, {"displayname": "displayName", "id": "id"})
        return page(request, [group_resource(request, svc, gid) for gid, name in sorted(svc.scim_groups.names.items())
                              if chosen is None or (gid if chosen[0] == "id" else name) == chosen[1]])
    body = await json_body(request)
    if not isinstance(body, dict):
        raise Refusal(400, "a group is a JSON object", scim_type="invalidSyntax")
    name = check_name(body.get("displayName"))
    emails = emails_of(svc, body.get("members", []))
    gid = str(uuid.uuid4())
    await run_in_threadpool(set_group, svc, gid, name, emails)
    return scim_json(group_resource(request, svc, gid), 201)


async def group(request: Request) -> Response:
    svc = service_of(request)
    gid = known_group(svc, request)
    if request.method == "GET":
        return scim_json(group_resource(request, svc, gid))
    if request.method == "DELETE":
        await run_in_threadpool(drop_group, svc, gid)
        return Response(status_code=204)
    body = await json_body(request)
    name = svc.scim_groups.names[gid]
    # everyone who holds the group now, SCIM's users or not: a PATCH adds to them or takes from them
    emails = [u.email for u in svc.gateway.identities.users if name in u.provider_groups]
    if request.method == "PUT":
        if not isinstance(body, dict):
            raise Refusal(400, "a group is a JSON object", scim_type="invalidSyntax")
        name, emails = check_name(body.get("displayName", name)), emails_of(svc, body.get("members", []))
    else:
        name, emails = patched_group(svc, patch_operations(body), name, emails)
    await run_in_threadpool(set_group, svc, gid, name, emails)
    return scim_json(group_resource(request, svc, gid))


def patched_group(svc, operations: list[dict], name: str, emails: list[str]) -> tuple[str, list[str]]:
    """NAME and member EMAILS once OPERATIONS (members add/remove/replace, displayName) are done."""
    emails = list(emails)
    for op in operations:
        kind, path, value = str(op["op"]).lower(), op.get("path"), op.get("value")
        if path is None and isinstance(value, dict):            # {"op": "replace", "value": {"displayName": ...}}
            for key, v in value.items():
                name, emails = patched_group(svc, [{"op": kind, "path": key, "value": v}], name, emails)
            continue
        by_filter = MEMBER_PATH.match(path or "")
        if by_filter:
            gone = set(emails_of(svc, [{"value": json.loads(f'"{by_filter.group(1)}"')}]))
            if kind != "remove":
                raise Refusal(400, "members[value eq ...] can only be removed", scim_type="invalidPath")
            emails = [e for e in emails if e not in gone]
        elif str(path).lower() == "members":
            given = emails_of(svc, value if value is not None else [])
            if kind == "replace":
                emails = given
            elif kind == "add":
                emails += [e for e in given if e not in emails]
            else:
                emails = [e for e in emails if e not in set(given)] if value is not None else []
        elif str(path).lower() == "displayname" and kind != "remove":
            name = check_name(value)
        else:
            raise Refusal(400, f"path {str(path)[:100]!r}: a group's members or displayName",
                          scim_type="invalidPath")
    return name, emails


async def service_provider_config(request: Request) -> Response:
    """What this SCIM service supports (RFC 7643 §5), for IdPs that ask before they push."""
    service_of(request)
    no = {"supported": False}
    return scim_json({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
                      "patch": {"supported": True}, "bulk": dict(no, maxOperations=0, maxPayloadSize=0),
                      "filter": {"supported": True, "maxResults": MAX_PAGE}, "changePassword": no, "sort": no,
                      "etag": no, "authenticationSchemes": [{"type": "oauthbearertoken", "name": "Bearer token",
                                                             "description": "identity.scim_token_file"}]})


ROUTES = [
    Route("/scim/v2/ServiceProviderConfig", service_provider_config, methods=["GET"]),
    Route("/scim/v2/Groups", groups, methods=["GET", "POST"]),
    Route("/scim/v2/Groups/{gid}", group, methods=["GET", "PUT", "PATCH", "DELETE"], name="scim_group"),
]
