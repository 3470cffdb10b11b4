"""The provider's admin channel: HTTP over a Unix socket (mode 0600, so only root on the host
reaches it; a socket file is not in any network namespace, so the host reaches the IdP's
admin side without entering zt-idp). JSON in, JSON out:

    POST /tokens                    {"email", "groups"?, "ttl"?, "claims"?} -> {"id_token"}
    GET  /keys                      -> {"kids": [...], "current"}
    POST /keys/rotate               {"alg"?: "RS256"|"ES256"} -> {"kid"}
    POST /keys/drop-old             -> {"dropped": [...]}
    GET  /users                     -> [{"email", "sub", "groups", "active"}]
    POST /users                     {"email", "password"?, "groups"?} -> {"user", "scim"}: a user
                                       added (or its password and groups set), and provisioned
                                       at the SCIM service provider (if one is set)
    PUT  /users/EMAIL/groups        {"groups": [...]} -> the user
    POST /users/EMAIL/deprovision   -> {"user", "scim"}: the user is off here, and the SCIM
                                       service provider (if one is set) is told
    PUT  /scim                      {"base_url", "token_file", "ca_file"?} -> where deprovisioning goes

AdminClient is the other end (httpx over the socket), used by `ztgate lab token` and the tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import httpx
from flask import Flask, jsonify, request

from .provider import Provider
from .scim import ScimTarget, deactivate, provision


def _user(u) -> dict:
    return {"email": u.email, "sub": u.sub, "groups": u.groups, "active": u.active}


def create_admin_app(provider: Provider, scim: Optional[ScimTarget]) -> Flask:
    app = Flask("ztgate-lab-idp-admin")
    target = {"scim": scim}

    def known(email: str):
        user = provider.directory.get(email)
        return user, (None if user else (jsonify(error=f"no user {email}"), 404))

    @app.post("/tokens")
    def tokens():
        body = request.get_json(force=True)
        try:
            token = provider.mint(body["email"], body.get("groups"), body.get("ttl"), body.get("claims"))
        except PermissionError as e:
            return jsonify(error=str(e)), 403
        return jsonify(id_token=token)

    @app.get("/keys")
    def keys():
        return jsonify(kids=provider.keys.kids(), current=provider.keys.current.kid)

    @app.post("/keys/rotate")
    def rotate():
        try:
            return jsonify(kid=provider.keys.rotate((request.get_json(silent=True) or {}).get("alg")))
        except ValueError as e:
            return jsonify(error=str(e)), 400

    @app.post("/keys/drop-old")
    def drop_old():
        return jsonify(dropped=provider.keys.drop_old())

    @app.get("/users")
    def users():
        return jsonify([_user(u) for u in provider.directory.all()])

    @app.post("/users")
    def add_user():
        body = request.get_json(force=True)
        user = provider.directory.add(body["email"], list(body.get("groups") or []), body.get("password"))
        sent = provision(target["scim"], user.email) if target["scim"] else {"sent": False, "error": "no SCIM target"}
        return jsonify(user=_user(user), scim=sent)

    @app.put("/users/<email>/groups")
    def set_groups(email):
        user, missing = known(email)
        if missing:
            return missing
        return jsonify(_user(provider.directory.set_groups(email, list(request.get_json(force=True)["groups"]))))

    @app.post("/users/<email>/deprovision")
    def deprovision(email):
        user, missing = known(email)
        if missing:
            return missing
        user = provider.deprovision(email)
        sent = deactivate(target["scim"], email) if target["scim"] else {"sent": False, "error": "no SCIM target"}
        return jsonify(user=_user(user), scim=sent)

    @app.put("/scim")
    def set_scim():
        body = request.get_json(force=True)
        target["scim"] = ScimTarget(body["base_url"], Path(body["token_file"]),
                                    Path(body["ca_file"]) if body.get("ca_file") else None)
        return jsonify(target["scim"].as_dict())

    return app


class AdminError(Exception):
    pass


class AdminClient:
    """The admin channel from the host: AdminClient(STATE/admin.sock).token("alice@example.com")."""

    def __init__(self, socket_path: Path, timeout: float = 30.0):
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://idp-admin",
                                 timeout=timeout)

    def _call(self, method: str, path: str, body: Optional[dict] = None):
        r = self.http.request(method, path, json=body)
        if r.status_code >= 400:
            raise AdminError(f"{method} {path}: {r.status_code} {r.json().get('error', r.text)}")
        return r.json()

    def token(self, email: str, groups: Optional[list[str]] = None, ttl: Optional[int] = None,
              claims: Optional[dict] = None) -> str:
        return self._call("POST", "/tokens", {"email": email, "groups": groups, "ttl": ttl,
                                              "claims": claims})["id_token"]

    def keys(self) -> dict:
        return self._call("GET", "/keys")

    def rotate(self, alg: Optional[str] = None) -> str:
        return self._call("POST", "/keys/rotate", {"alg": alg} if alg else {})["kid"]

    def drop_old_keys(self) -> list[str]:
        return self._call("POST", "/keys/drop-old")["dropped"]

    def users(self) -> list[dict]:
        return self._call("GET", "/users")

    def add_user(self, email: str, groups: list[str], password: Optional[str] = None) -> dict:
        return self._call("POST", "/users", {"email": email, "groups": list(groups), "password": password})

    def set_groups(self, email: str, groups: list[str]) -> dict:
        return self._call("PUT", f"/users/{email}/groups", {"groups": list(groups)})

    def deprovision(self, email: str) -> dict:
        return self._call("POST", f"/users/{email}/deprovision")

    def set_scim(self, base_url: str, token_file: Path, ca_file: Optional[Path] = None) -> dict:
        return self._call("PUT", "/scim", {"base_url": base_url, "token_file": str(token_file),
                                           "ca_file": str(ca_file) if ca_file else None})

    def close(self) -> None:
        self.http.close()
