"""The provider as a SCIM 2.0 client (RFC 7644). Adding a user provisions it at the service
provider (the gateway's enrollment service), as an IdP pushes the users assigned to an app:

    POST  {base}/Users   {"userName": EMAIL, "active": true, "emails": [...]}  -> its SCIM id

and deprovisioning a user tells the service provider with

    GET   {base}/Users?filter=userName eq "EMAIL"        -> the user's SCIM id
    PATCH {base}/Users/{id}   {"Operations": [{"op": "replace", "path": "active", "value": false}]}

behind `Authorization: Bearer <token from a file>`, over HTTPS checked against a CA file.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

SCIM_JSON = "application/scim+json"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
USER = "urn:ietf:params:scim:schemas:core:2.0:User"


@dataclass
class ScimTarget:
    base_url: str                      # e.g. https://198.18.0.1:8443/scim/v2
    token_file: Path
    ca_file: Optional[Path] = None

    def as_dict(self) -> dict:
        return {"base_url": self.base_url, "token_file": str(self.token_file),
                "ca_file": str(self.ca_file) if self.ca_file else None}


def _filter_value(email: str) -> str:
    """A SCIM filter string literal (RFC 7644 §3.4.2.2: JSON string rules)."""
    return '"' + email.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _client(target: ScimTarget, timeout: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {target.token_file.read_text().strip()}", "Accept": SCIM_JSON}
    verify = ssl.create_default_context(cafile=target.ca_file) if target.ca_file else True
    return httpx.Client(base_url=target.base_url.rstrip("/"), headers=headers, verify=verify, timeout=timeout)


def provision(target: ScimTarget, email: str, timeout: float = 10.0) -> dict:
    """Create the user, active, at the service provider (which binds a user of that email it
    has already). Returns what happened (never raises for an HTTP or network failure)."""
    body = {"schemas": [USER], "userName": email, "active": True,
            "emails": [{"value": email, "primary": True, "type": "work"}]}
    try:
        with _client(target, timeout) as http:
            made = http.post("/Users", json=body, headers={"Content-Type": SCIM_JSON})
            answer = made.json() if made.status_code == 201 else {}
            return {"sent": made.status_code == 201, "step": "create", "status": made.status_code,
                    "id": answer.get("id"), "body": made.text[:500]}
    except (httpx.HTTPError, ValueError) as e:
        return {"sent": False, "step": "connect", "error": f"{e.__class__.__name__}: {e}"}


def deactivate(target: ScimTarget, email: str, timeout: float = 10.0) -> dict:
    """Deactivate the user at the service provider. Returns what happened (never raises for an
    HTTP or network failure: the IdP's own deprovisioning stands either way)."""
    try:
        with _client(target, timeout) as http:
            found = http.get("/Users", params={"filter": f"userName eq {_filter_value(email)}"})
            if found.status_code != 200:
                return {"sent": False, "step": "find", "status": found.status_code, "body": found.text[:500]}
            resources = found.json().get("Resources") or []
            if not resources:
                return {"sent": False, "step": "find", "status": 200, "error": f"no SCIM user {email}"}
            scim_id = resources[0]["id"]
            body = {"schemas": [PATCH_OP], "Operations": [{"op": "replace", "path": "active", "value": False}]}
            patched = http.patch(f"/Users/{scim_id}", json=body, headers={"Content-Type": SCIM_JSON})
            return {"sent": patched.status_code in (200, 204), "step": "patch", "id": scim_id,
                    "status": patched.status_code, "body": patched.text[:500]}
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return {"sent": False, "step": "connect", "error": f"{e.__class__.__name__}: {e}"}
