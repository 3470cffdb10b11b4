"""ID token checks (control/identity/tokens.py) against a real HTTPS key server on loopback:
every check of IDENTITY.md refused with its own reason, the hostile tokens of issue 14, and
the JWKS cache (rotation, at most one refetch a minute for unseen keys, dropped keys)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from control.config import parse_config
from control.identity.tokens import JWKS_MAX_AGE, ProviderUnavailable, TokenRefused, Verifier
from tests.identity_keys import KeyServer, SigningKey


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    server = KeyServer(tmp_path_factory.mktemp("keyserver"))
    yield server
    server.stop()


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def verifier(keys, clock=time.time, **identity) -> Verifier:
    doc = {"issuer": keys.issuer, "client_id": "ztgate", "ca_file": str(keys.ca_file), "listen": "127.0.0.1:8443",
           "tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}
    doc.update(identity)
    return Verifier(parse_config({"identity": doc}).identity, clock=clock)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def refused(v: Verifier, token, check: str, **kw) -> TokenRefused:
    with pytest.raises(TokenRefused) as e:
        v.verify(token, **kw)
    assert e.value.check == check, str(e.value)
    assert str(e.value).startswith(f"{check}: ")
    return e.value


def test_a_good_token_gives_the_user(keys):
    who = verifier(keys).verify(keys.token("alice@example.com", ["developers", "staff"]))
    assert (who.issuer, who.subject, who.email, who.groups) == (
        keys.issuer, "sub-alice@example.com", "alice@example.com", ("developers", "staff"))


@pytest.mark.parametrize("alg", ["RS384", "PS256", "PS512", "ES256", "ES384", "EdDSA"])
def test_every_asymmetric_algorithm_of_the_spec(keys, alg):
    key = SigningKey(alg)
    keys.keys.append(key)
    try:
        assert verifier(keys).verify(keys.token("a@example.com", key=key)).email == "a@example.com"
    finally:
        keys.keys.remove(key)


def test_hostile_signatures_and_algorithms(keys):
    v = verifier(keys)
    good = keys.keys[-1]
    claims = keys.claims("mallory@example.com")
    # signed by another key, under a kid the JWKS does not have, or under the provider's kid
    other = SigningKey("RS256")
    refused(v, keys.token("mallory@example.com", key=other), "kid")
    refused(v, jwt.encode(claims, other.key, "RS256", headers={"kid": good.kid}), "signature")
    # alg none, with and without the provider's kid
    unsigned = b64(json.dumps({"alg": "none", "kid": good.kid}).encode()) + "." + b64(json.dumps(claims).encode()) + "."
    refused(v, unsigned, "alg")
    # HS256 with the provider's public key as the HMAC secret (key confusion)
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": good.kid}).encode()) + "." + b64(json.dumps(claims).encode())
    forged = head + "." + b64(hmac.new(good.public_pem, head.encode(), hashlib.sha256).digest())
    refused(v, forged, "alg")
    # an RSA key asked to verify ES256, and the provider's key under a PS alg it is not for
    refused(v, jwt.encode(claims, SigningKey("ES256").key, "ES256", headers={"kid": good.kid}), "alg")
    keys.keys[-1].jwk["alg"] = "RS256"
    refused(verifier(keys), jwt.encode(claims, good.key, "PS256", headers={"kid": good.kid}), "alg")
    # no kid; not a JWS at all; truncated
    refused(v, jwt.encode(claims, good.key, "RS256"), "kid")
    refused(v, "not-a-token", "jws")
    for cut in range(1, 5):      # the signature's base64 cut: badly padded, or a shorter signature
        with pytest.raises(TokenRefused, match="^(jws|signature): "):
            v.verify(keys.token("a@example.com")[:-cut])
    refused(v, "", "token")
    refused(v, "x" * 20000, "token")


def test_each_claim_check_names_itself(keys):
    v = verifier(keys, allowed_domains=["example.com"])
    now = int(time.time())
    t = keys.token
    refused(v, t("a@example.com", ttl=-120), "exp")
    refused(v, t("a@example.com", nbf=now + 300), "nbf")
    refused(v, t("a@example.com", iat=now + 300), "iat")
    refused(v, t("a@example.com", iss="https://evil.example.com"), "iss")
    refused(v, t("a@example.com", aud="someone-else"), "aud")
    refused(v, t("a@example.com", sub=None), "sub")
    refused(v, t("a@example.com", exp=None), "exp")
    refused(v, t("a@example.com", email_verified=False), "email_verified")
    refused(v, t("a@example.com", email=None), "email")
    refused(v, t("a@example.com", groups="developers"), "groups")
    assert refused(v, t("a@evil.example.org"), "domain").status == 403
    refused(v, t("a@example.com", nonce="n1"), "nonce", nonce="n2")
    # within the 60 s of skew: accepted
    assert v.verify(t("a@example.com", ttl=-30)).email == "a@example.com"
    assert v.verify(t("a@example.com", iat=now + 30, nbf=now + 30, nonce="n1"), nonce="n1").email == "a@example.com"
    # aud as a list holding ours; the configured audiences; a nested groups claim
    assert v.verify(t("a@example.com", aud=["other", "ztgate"])).email == "a@example.com"
    refused(verifier(keys, audiences=["ztgate-cli"]), t("a@example.com"), "aud")
    nested = verifier(keys, groups_claim="realm_access.roles")
    assert nested.verify(t("a@example.com", realm_access={"roles": ["ops"]})).groups == ("ops",)


def test_rotation_refetches_unseen_keys_at_most_once_a_minute(keys):
    clock = Clock()
    v = verifier(keys, clock)
    v.verify(keys.token("a@example.com"))
    fetches, before = keys.jwks_fetches, list(keys.keys)
    new = SigningKey("ES256")
    keys.keys.append(new)
    try:
        # just fetched: an unseen kid does not refetch yet (a flood of made-up kids costs the IdP nothing)
        refused(v, keys.token("a@example.com", key=new), "kid")
        clock.now += 61
        assert v.verify(keys.token("a@example.com", key=new)).email == "a@example.com"
        assert keys.jwks_fetches == fetches + 1
        for _ in range(5):
            refused(v, keys.token("a@example.com", key=SigningKey("RS256")), "kid")
        assert keys.jwks_fetches == fetches + 1
        # the old key dropped: its tokens refused once the cache is refetched
        old = keys.keys.pop(0)
        assert v.verify(keys.token("a@example.com", key=old)).email == "a@example.com"   # cached still
        clock.now += JWKS_MAX_AGE
        refused(v, keys.token("a@example.com", key=old), "kid")
        assert v.verify(keys.token("a@example.com", key=new)).email == "a@example.com"
    finally:
        keys.keys[:] = before


def test_an_untrusted_provider_certificate_checks_nothing(keys):
    v = verifier(keys, ca_file="/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(ProviderUnavailable, match="cannot reach"):
        v.verify(keys.token("a@example.com"))
