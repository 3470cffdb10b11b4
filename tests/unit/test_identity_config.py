"""`identity:` in the gateway's config: defaults, and each refusal naming its key."""
from __future__ import annotations

from pathlib import Path

import pytest

from control.config import parse_config
from control.errors import InputError

BASE = {"issuer": "https://idp.example.com", "client_id": "ztgate", "listen": "0.0.0.0:8443",
        "tls_cert": "/etc/ztgate/enroll.pem", "tls_key": "/etc/ztgate/enroll.key"}


def identity(**changes):
    doc = dict(BASE, **changes)
    return parse_config({"identity": {k: v for k, v in doc.items() if v is not None}}, "gateway.yaml").identity


def test_defaults_and_every_key():
    assert parse_config({}).identity is None and parse_config({"identity": None}).identity is None
    cfg = identity()
    assert (cfg.audiences, cfg.email_claim, cfg.groups_claim, cfg.session, cfg.allowed_domains) == (
        ("ztgate",), "email", "groups", 86400, ())
    assert cfg.listen_address == ("0.0.0.0", 8443) and cfg.tls_cert == Path("/etc/ztgate/enroll.pem")
    assert cfg.discovery_url == "https://idp.example.com/.well-known/openid-configuration"
    cfg = identity(client_secret_file="/s", audiences=["a", "b"], ca_file="/ca.pem", email_claim="upn",
                   groups_claim="realm_access.roles", allowed_domains=["Example.COM"], session="15m",
                   scim_token_file="/t", public_url="https://gw.example.com:8443/", listen="[::]:443")
    assert (cfg.audiences, cfg.allowed_domains, cfg.session, cfg.public_url, cfg.listen_address) == (
        ("a", "b"), ("example.com",), 900, "https://gw.example.com:8443", ("::", 443))
    assert identity(issuer="http://127.0.0.1:9000").issuer == "http://127.0.0.1:9000"
    assert identity(issuer="http://[::1]:9000", session=3600).session == 3600
    assert identity().max_devices == 10 and identity(max_devices=3).max_devices == 3


@pytest.mark.parametrize("changes, message", [
    ({"issuer": "http://idp.example.com"}, "identity.issuer: 'http://idp.example.com': the issuer must be https://"),
    ({"issuer": "ftp://idp"}, "identity.issuer: 'ftp://idp' is not an https:// URL"),
    ({"issuer": "https://idp.example.com?x=1"}, "identity.issuer: 'https://idp.example.com?x=1': the issuer may not"),
    ({"issuer": None}, "identity.issuer: missing (required: issuer, client_id, listen, tls_cert, tls_key)"),
    ({"client_id": ""}, "identity.client_id: must be a non-empty string"),
    ({"listen": "8443"}, "identity.listen: '8443' is not ADDRESS:PORT"),
    ({"audiences": "ztgate"}, "identity.audiences: must be a non-empty list of strings"),
    ({"allowed_domains": ["not a domain"]}, "identity.allowed_domains: 'not a domain' is not a domain name"),
    ({"session": "1w"}, "identity.session: must be a duration from 1m to 365d"),
    ({"session": 10}, "identity.session: must be a duration from 1m to 365d"),
    ({"public_url": "http://gw.example.com"}, "identity.public_url: 'http://gw.example.com': the enrollment page"),
    ({"rate_limit": 0}, "identity.rate_limit: must be requests a second from 1 to 100000, got 0"),
    ({"max_devices": 0}, "identity.max_devices: must be a number of devices from 1 to 10000, got 0"),
    ({"max_devices": True}, "identity.max_devices: must be a number of devices from 1 to 10000, got True"),
    ({"scim_token": "/t"}, "identity: unknown setting 'scim_token' (known: issuer, client_id,"),
])
def test_refusals_name_the_key(changes, message):
    with pytest.raises(InputError) as e:
        identity(**changes)
    assert str(e.value).startswith(f"gateway.yaml: {message}"), str(e.value)


def test_not_a_mapping():
    with pytest.raises(InputError, match="gateway.yaml: identity: must be a mapping of issuer, client_id"):
        parse_config({"identity": ["issuer"]}, "gateway.yaml")
