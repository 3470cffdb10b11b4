"""The token checks against the lab's real OpenID provider (the `idp` fixture: its own process,
HTTPS, Authlib-signed tokens): its tokens accepted, hostile ones refused with the right reason,
and key rotation followed without a restart."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from control.config import parse_config
from control.identity.tokens import JWKS_MAX_AGE, TokenRefused, Verifier
from tests.identity_keys import SigningKey


def verifier(idp, clock=time.time, **identity) -> Verifier:
    doc = {"issuer": idp.issuer, "client_id": idp.client_id, "ca_file": str(idp.ca_file),
           "listen": "127.0.0.1:8443", "tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}
    doc.update(identity)
    return Verifier(parse_config({"identity": doc}).identity, clock=clock)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def check_of(v: Verifier, token: str) -> str:
    with pytest.raises(TokenRefused) as e:
        v.verify(token)
    return e.value.check


def test_the_providers_tokens_and_every_hostile_one(idp):
    v = verifier(idp, allowed_domains=["example.com"])
    who = v.verify(idp.token("alice@example.com"))
    assert (who.email, who.groups, who.issuer) == ("alice@example.com", ("developers", "staff"), idp.issuer)
    now = int(time.time())
    assert check_of(v, idp.token("alice@example.com", ttl=-300)) == "exp"
    assert check_of(v, idp.token("alice@example.com", nbf=now + 600)) == "nbf"
    assert check_of(v, idp.token("alice@example.com", iss="https://other.example.com")) == "iss"
    assert check_of(v, idp.token("alice@example.com", aud="not-ztgate")) == "aud"
    assert check_of(v, idp.token("alice@example.com", email_verified=False)) == "email_verified"
    assert check_of(v, idp.token("mallory@evil.example.org")) == "domain"

    good = idp.token("alice@example.com")
    header = jwt.get_unverified_header(good)
    claims = jwt.decode(good, options={"verify_signature": False})
    other = SigningKey(header["alg"])
    # signed by another key: under its own kid, and under the provider's (a JWKS kid that is not the signer)
    assert check_of(v, jwt.encode(claims, other.key, header["alg"], headers={"kid": other.kid})) == "kid"
    assert check_of(v, jwt.encode(claims, other.key, header["alg"], headers={"kid": header["kid"]})) == "signature"
    # alg none
    assert check_of(v, b64(json.dumps({"alg": "none", "kid": header["kid"]}).encode()) + "."
                    + b64(json.dumps(claims).encode()) + ".") == "alg"
    # HS256 with the provider's own public key (as published in its JWKS, in PEM) as the secret
    jwk = next(k for k in v.provider._get(v.provider.discovery()["jwks_uri"])["keys"] if k["kid"] == header["kid"])
    pem = jwt.PyJWK(jwk).key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = b64(json.dumps({"alg": "HS256", "kid": header["kid"]}).encode()) + "." + b64(json.dumps(claims).encode())
    forged = signing_input + "." + b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    assert check_of(v, forged) == "alg"


def test_rotation_without_a_restart_and_dropped_keys_refused(idp):
    clock = type("Clock", (), {"now": time.time(), "__call__": lambda self: self.now})()
    v = verifier(idp, clock)
    old = idp.token("alice@example.com")
    assert v.verify(old).email == "alice@example.com"
    idp.rotate("ES256")
    new = idp.token("alice@example.com")
    assert jwt.get_unverified_header(new)["kid"] != jwt.get_unverified_header(old)["kid"]
    clock.now += 61                      # an unseen kid refetches, at most once a minute
    assert v.verify(new).email == "alice@example.com"
    assert v.verify(old).email == "alice@example.com"      # both keys published
    idp.drop_old_keys()
    clock.now += JWKS_MAX_AGE
    assert check_of(v, old) == "kid"
    assert v.verify(new).email == "alice@example.com"
