"""python -m lab.idp serve | token | rotate | drop-old-keys | add-user | set-groups | deprovision

`serve` runs the provider (lab/idp/server.py); the others talk to a running one over its admin
socket (lab/idp/admin.py) and print JSON (token: the bare ID token).

    python -m lab.idp serve --listen 127.0.0.1:0 --state /tmp/idp --users users.yaml
    python -m lab.idp token --admin /tmp/idp/admin.sock alice@example.com --groups staff --ttl 300
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .admin import AdminClient, AdminError
from .scim import ScimTarget
from .server import Settings, serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab.idp", description="ztgate's lab OpenID provider")
    verbs = p.add_subparsers(dest="verb", required=True)
    sv = verbs.add_parser("serve", help="run the provider")
    sv.add_argument("--listen", required=True, metavar="HOST:PORT", help="HTTPS address (port 0: any)")
    sv.add_argument("--state", required=True, type=Path, metavar="DIR", help="keys, users, CA, admin socket")
    sv.add_argument("--issuer", help="default https://HOST:PORT")
    sv.add_argument("--users", type=Path, metavar="FILE", help="YAML: users: [{email, password, groups}]")
    sv.add_argument("--tls-cert", type=Path, metavar="FILE", help="default: a CA and certificate made in DIR")
    sv.add_argument("--tls-key", type=Path, metavar="FILE")
    sv.add_argument("--client-id", default="ztgate")
    sv.add_argument("--redirect-prefix", action="append", default=[], metavar="URL",
                    help="redirect URIs allowed below this prefix (loopback http ones always are)")
    sv.add_argument("--id-token-ttl", type=int, default=600, metavar="SECONDS")
    sv.add_argument("--alg", default="RS256", choices=("RS256", "ES256"), help="the first key's algorithm")
    sv.add_argument("--scim-url", metavar="URL", help="SCIM base, e.g. https://198.18.0.1:8443/scim/v2")
    sv.add_argument("--scim-token-file", type=Path, metavar="FILE")
    sv.add_argument("--scim-ca", type=Path, metavar="FILE", help="CA of the SCIM service's certificate")
    for name, help_ in (("token", "print an ID token"), ("rotate", "add a signing key"),
                        ("drop-old-keys", "drop all but the current key"),
                        ("add-user", "add a user (and provision it at SCIM)"), ("set-groups", "set a user's groups"),
                        ("deprovision", "deprovision a user (and tell SCIM)")):
        sp = verbs.add_parser(name, help=help_)
        sp.add_argument("--admin", required=True, type=Path, metavar="SOCKET", help="STATE/admin.sock")
        if name in ("token", "add-user", "set-groups", "deprovision"):
            sp.add_argument("email")
        if name in ("token", "add-user", "set-groups"):
            sp.add_argument("--groups", default=None, metavar="G,..")
        if name == "token":
            sp.add_argument("--ttl", type=int, metavar="SECONDS")
        if name == "add-user":
            sp.add_argument("--password", metavar="TEXT", help="for the login form (default: none, tokens only)")
        if name == "rotate":
            sp.add_argument("--alg", choices=("RS256", "ES256"))
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.verb == "serve":
        if a.scim_url and not a.scim_token_file:
            _parser().error("--scim-url needs --scim-token-file")
        scim = ScimTarget(a.scim_url, a.scim_token_file, a.scim_ca) if a.scim_url else None
        return serve(Settings(a.listen, a.state, a.issuer, a.users, a.tls_cert, a.tls_key, a.client_id,
                              tuple(a.redirect_prefix), a.id_token_ttl, a.alg, scim))
    admin = AdminClient(a.admin)
    groups = [g for g in a.groups.split(",") if g] if getattr(a, "groups", None) is not None else None
    try:
        if a.verb == "token":
            print(admin.token(a.email, groups, a.ttl))
            return 0
        result = {"rotate": lambda: admin.rotate(a.alg), "drop-old-keys": admin.drop_old_keys,
                  "add-user": lambda: admin.add_user(a.email, groups or [], a.password),
                  "set-groups": lambda: admin.set_groups(a.email, groups or []),
                  "deprovision": lambda: admin.deprovision(a.email)}[a.verb]()
    except AdminError as e:
        print(f"python -m lab.idp {a.verb}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
