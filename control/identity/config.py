"""`identity:` in the gateway's config file: the IdP the gateway trusts and its enrollment
service (contract: shared/spec/IDENTITY.md, "Gateway configuration"). Parsed as strictly as
the rest of the file: every refusal names the key.

    identity:
      issuer: https://idp.example.com       # https only, except on a loopback address
      client_id: ztgate
      client_secret_file: /etc/ztgate/oidc-secret   # optional (public clients use PKCE alone)
      audiences: [ztgate]                   # default [client_id]
      ca_file: /etc/ztgate/idp-ca.pem       # optional
      email_claim: email
      groups_claim: groups                  # a dotted path reaches nested claims (realm_access.roles)
      allowed_domains: [example.com]        # optional
      session: 24h
      listen: 0.0.0.0:8443
      tls_cert: /etc/ztgate/enroll.pem
      tls_key: /etc/ztgate/enroll.key
      scim_token_file: /etc/ztgate/scim-token   # optional: enables /scim/v2
      public_url: https://gw.example.com:8443   # optional: the page's own URL (its redirect URI)
      rate_limit: 20                        # requests a second per client address (3 s of them at once)
      max_devices: 10                       # devices a user may have when enrolling one through the IdP
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

REQUIRED = ("issuer", "client_id", "listen", "tls_cert", "tls_key")
OPTIONAL = ("client_secret_file", "audiences", "ca_file", "email_claim", "groups_claim", "allowed_domains",
            "session", "scim_token_file", "public_url", "rate_limit", "max_devices")
DURATION = re.compile(r"(\d+)([smhd]?)\Z")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
SESSION_MIN, SESSION_MAX = 60, 365 * 86400
DOMAIN = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


@dataclass(frozen=True)
class IdentityConfig:
    issuer: str
    client_id: str
    listen: str
    tls_cert: Path
    tls_key: Path
    client_secret_file: Optional[Path] = None
    audiences: tuple = ()
    ca_file: Optional[Path] = None
    email_claim: str = "email"
    groups_claim: str = "groups"
    allowed_domains: tuple = ()
    session: int = 86400
    scim_token_file: Optional[Path] = None
    public_url: Optional[str] = None
    rate_limit: int = 20
    max_devices: int = 10

    @property
    def listen_address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_https(url: str, what: str) -> Optional[str]:
    """Why URL may not be used for WHAT (None when it may): https, or http on loopback only."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        return f"{url!r} is not a URL"
    if not parts.hostname or parts.scheme not in ("https", "http"):
        return f"{url!r} is not an https:// URL"
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return f"{url!r}: {what} must be https:// (plain http only on a loopback address)"
    if parts.query or parts.fragment or parts.username or parts.password:
        return f"{url!r}: {what} may not have a query, a fragment or credentials"
    return None


def parse_duration(v: Any) -> Optional[int]:
    """Seconds from 90, '90s', '15m', '24h' or '7d'; None if it is not one."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = DURATION.match(v) if isinstance(v, str) else None
    return int(m.group(1)) * UNITS[m.group(2)] if m else None


def parse_identity(doc: Any, bad: Callable[[str, str], Exception]) -> IdentityConfig:
    """The `identity:` mapping; BAD(key, what) makes the error that names the key."""
    if not isinstance(doc, dict):
        raise bad("identity", f"must be a mapping of {', '.join(REQUIRED + OPTIONAL)}")
    for key in doc:
        if key not in REQUIRED + OPTIONAL:
            raise bad("identity", f"unknown setting {key!r} (known: {', '.join(REQUIRED + OPTIONAL)})")
    for key in REQUIRED:
        if key not in doc:
            raise bad(f"identity.{key}", "missing (required: " + ", ".join(REQUIRED) + ")")

    def text(key: str) -> str:
        v = doc[key]
        if not isinstance(v, str) or not v.strip() or v != v.strip():
            raise bad(f"identity.{key}", f"must be a non-empty string without surrounding spaces, got {v!r}")
        return v

    def names(key: str, lower: bool = False) -> tuple:
        v = doc[key]
        if not isinstance(v, list) or not v:
            raise bad(f"identity.{key}", f"must be a non-empty list of strings, got {v!r}")
        for item in v:
            if not isinstance(item, str) or not item.strip():
                raise bad(f"identity.{key}", f"{item!r} is not a non-empty string")
        return tuple(dict.fromkeys(item.lower() if lower else item for item in v))

    values: dict[str, Any] = {k: text(k) for k in REQUIRED}
    for key in ("issuer", "public_url"):
        if key in doc:
            why = check_https(text(key), "the issuer" if key == "issuer" else "the enrollment page")
            if why:
                raise bad(f"identity.{key}", why)
            values[key] = doc[key].rstrip("/") if key == "public_url" else doc[key]
    host, sep, port = values["listen"].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad("identity.listen", f"{values['listen']!r} is not ADDRESS:PORT (such as 0.0.0.0:8443)")
    for key in ("tls_cert", "tls_key"):
        values[key] = Path(values[key])
    for key in ("client_secret_file", "ca_file", "scim_token_file"):
        if key in doc:
            values[key] = Path(text(key))
    for key in ("email_claim", "groups_claim"):
        if key in doc:
            values[key] = text(key)
    if "audiences" in doc:
        values["audiences"] = names("audiences")
    else:
        values["audiences"] = (values["client_id"],)
    if "allowed_domains" in doc:
        values["allowed_domains"] = names("allowed_domains", lower=True)
        for d in values["allowed_domains"]:
            if not DOMAIN.match(d):
                raise bad("identity.allowed_domains", f"{d!r} is not a domain name like example.com")
    if "session" in doc:
        seconds = parse_duration(doc["session"])
        if seconds is None or not SESSION_MIN <= seconds <= SESSION_MAX:
            raise bad("identity.session", f"must be a duration from 1m to 365d (such as 90s, 15m, 24h, 7d), "
                                          f"got {doc['session']!r}")
        values["session"] = seconds
    if "rate_limit" in doc:
        v = doc["rate_limit"]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 100_000:
            raise bad("identity.rate_limit", f"must be requests a second from 1 to 100000, got {v!r}")
        values["rate_limit"] = v
    if "max_devices" in doc:
        v = doc["max_devices"]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 10_000:
            raise bad("identity.max_devices", f"must be a number of devices from 1 to 10000, got {v!r}")
        values["max_devices"] = v
    return IdentityConfig(**values)
