"""For the identity tests: a CA and server certificates (cryptography), signing keys of every
type the gateway accepts, and a key server: a real HTTPS server (uvicorn) on loopback that
publishes discovery and a JWKS, so that the verifier fetches, caches and refetches over TLS
exactly as it does from an IdP. Tokens are signed here with PyJWT."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import threading
import time
import uuid
from pathlib import Path

import jwt
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

ISSUER_HOST = "127.0.0.1"


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(tmp: Path, ip: str = ISSUER_HOST) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA and a certificate for IP it signs."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ztgate test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


class SigningKey:
    """A private key, its kid and algorithm, and its public JWK."""

    def __init__(self, alg: str = "RS256", kid: str | None = None):
        self.alg = alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        if alg.startswith(("RS", "PS")):
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            self.key = ec.generate_private_key(ec.SECP256R1())
        elif alg == "ES384":
            self.key = ec.generate_private_key(ec.SECP384R1())
        else:
            self.key = ed25519.Ed25519PrivateKey.generate()
        algo = jwt.get_algorithm_by_name(alg)
        self.jwk = dict(json.loads(algo.to_jwk(self.key.public_key())), kid=self.kid, use="sig")

    @property
    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)


class KeyServer:
    """Discovery and JWKS over HTTPS on loopback; `keys` is what the JWKS publishes now."""

    def __init__(self, tmp: Path, audience: str = "ztgate"):
        self.ca_file, cert, key = make_pki(tmp)
        self.audience = audience
        self.keys = [SigningKey("RS256")]
        self.jwks_fetches = 0
        with socket.socket() as s:
            s.bind((ISSUER_HOST, 0))
            self.port = s.getsockname()[1]
        self.issuer = f"https://{ISSUER_HOST}:{self.port}"
        app = Starlette(routes=[Route("/.well-known/openid-configuration", self._discovery),
                                Route("/jwks", self._jwks)])
        self.server = uvicorn.Server(uvicorn.Config(app, host=ISSUER_HOST, port=self.port, log_level="warning",
                                                    ssl_certfile=str(cert), ssl_keyfile=str(key)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "the key server did not start"
            time.sleep(0.02)

    def _discovery(self, request):
        return JSONResponse({"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks",
                             "authorization_endpoint": f"{self.issuer}/authorize",
                             "token_endpoint": f"{self.issuer}/token"})

    def _jwks(self, request):
        self.jwks_fetches += 1
        return JSONResponse({"keys": [k.jwk for k in self.keys]})

    def claims(self, email: str, /, groups=None, ttl: int = 300, **overrides) -> dict:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": f"sub-{email}", "email": email,
                  "email_verified": True, "groups": list(groups) if isinstance(groups, (list, tuple)) else groups or [], "iat": now, "exp": now + ttl}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, email: str, /, groups=None, ttl: int = 300, key: SigningKey | None = None, **overrides) -> str:
        key = key or self.keys[-1]
        return jwt.encode(self.claims(email, groups, ttl, **overrides), key.key, algorithm=key.alg,
                          headers={"kid": key.kid})

    def stop(self) -> None:
        self.server.should_exit = self.server.force_exit = True     # keep-alive connections are not waited for
        self.thread.join(timeout=10)
