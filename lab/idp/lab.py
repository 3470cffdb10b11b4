"""The IdP's part of the lab (spec/IDENTITY.md, "The lab"): the lab's CA, the certificates of
the IdP (198.18.0.30) and of the gateway's enrollment service (198.18.0.1), the SCIM bearer
token both sides share, the lab's users with their passwords, and the command that runs the
provider in zt-idp. lab/lab.py runs that command like its other processes; `down` removes all
of it with /run/ztgate-lab. Every path is named here (and in docs/lab.md).
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Optional

import yaml

from . import pki
from .admin import AdminClient

NS_IDP = "zt-idp"
ADDRESS = "198.18.0.30"
PORT = 8443
ISSUER = f"https://{ADDRESS}:{PORT}"
GATEWAY = "198.18.0.1"
ENROLL_URL = f"https://{GATEWAY}:8443"           # the gateway's enrollment service and SCIM


class Paths:
    """Under the lab's run directory (/run/ztgate-lab)."""

    def __init__(self, run: Path):
        self.ca, self.ca_key = run / "ca.pem", run / "ca.key"
        self.idp_cert, self.idp_key = run / "idp.pem", run / "idp.key"
        self.enroll_cert, self.enroll_key = run / "enroll.pem", run / "enroll.key"
        self.scim_token = run / "scim-token"
        self.users = run / "idp-users.yaml"
        self.state = run / "idp"                 # keys.json, users.json, issuer, admin.sock
        self.admin = self.state / "admin.sock"


def password(email: str) -> str:
    """The lab users' login-form passwords: alice@example.com logs in with alice-password."""
    return f"{email.split('@')[0]}-password"


def _secret_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def prepare(run: Path, users) -> list[str]:
    """Make the CA, the certificates, the SCIM token and the users file; return the command
    that serves the IdP (to run in zt-idp). users: ((email, groups), ...)."""
    p = Paths(run)
    pki.make_ca(p.ca, p.ca_key)
    pki.issue(p.ca, p.ca_key, p.idp_cert, p.idp_key, [ADDRESS])
    pki.issue(p.ca, p.ca_key, p.enroll_cert, p.enroll_key, [GATEWAY])
    _secret_file(p.scim_token, secrets.token_urlsafe(32))
    _secret_file(p.users, yaml.safe_dump({"users": [{"email": e, "password": password(e), "groups": list(g)}
                                                    for e, g in users]}))
    return [sys.executable, "-m", "lab.idp", "serve", "--listen", f"{ADDRESS}:{PORT}", "--issuer", ISSUER,
            "--state", str(p.state), "--users", str(p.users), "--tls-cert", str(p.idp_cert),
            "--tls-key", str(p.idp_key), "--redirect-prefix", f"{ENROLL_URL}/",
            "--scim-url", f"{ENROLL_URL}/scim/v2", "--scim-token-file", str(p.scim_token), "--scim-ca", str(p.ca)]


def serving(run: Path) -> bool:
    """The IdP has bound its HTTPS port and its admin socket (it writes `issuer` after both)."""
    return (Paths(run).state / "issuer").exists()


def admin(run: Path) -> AdminClient:
    return AdminClient(Paths(run).admin)


def current_kids(run: Path) -> Optional[dict]:
    """{"kids", "current"} from the running IdP, or None when its admin socket does not answer."""
    if not Paths(run).admin.exists():
        return None
    client = admin(run)
    try:
        return client.keys()
    except Exception:       # noqa: BLE001 (any failure of a status probe means "not answering")
        return None
    finally:
        client.close()


def _https_check(run: Path, url: str) -> list[str]:
    """A fetch of URL over HTTPS checked against the lab's CA, to run in a namespace of the lab
    (python's urllib, as lab.http_get: nothing else to install)."""
    code = ("import ssl, sys, urllib.request\n"
            f"ctx = ssl.create_default_context(cafile={str(Paths(run).ca)!r})\n"
            f"urllib.request.urlopen({url!r}, timeout=5, context=ctx)")
    return [sys.executable, "-c", code]


def discovery_check(run: Path) -> list[str]:
    """The IdP's discovery document, fetched the way the gateway reaches it (run in zt-gw)."""
    return _https_check(run, ISSUER + "/.well-known/openid-configuration")


def enrollment_check(run: Path) -> list[str]:
    """The gateway's enrollment service (GET /v1/oidc), fetched the way the IdP's SCIM pushes
    reach it (run in zt-idp)."""
    return _https_check(run, ENROLL_URL + "/v1/oidc")


def gateway_identity(run: Path) -> str:
    """The `identity:` block of the lab gateway's configuration (spec/IDENTITY.md): it trusts
    this IdP and serves enrollment and SCIM at ENROLL_URL with a certificate of the lab's CA."""
    p = Paths(run)
    return (f"identity:\n  issuer: {ISSUER}\n  client_id: ztgate\n  ca_file: {p.ca}\n  session: 24h\n"
            f"  listen: {GATEWAY}:8443\n  tls_cert: {p.enroll_cert}\n  tls_key: {p.enroll_key}\n"
            f"  scim_token_file: {p.scim_token}\n")
