"""ID tokens from the IdP, checked as shared/spec/IDENTITY.md ("What a token must be") says.

PyJWT does the JOSE work (JWS parsing, signatures, the registered claims); httpx fetches
discovery and the JWKS, trusting the configured CA. What is ours is the policy around them:

- The algorithm comes from the key, never from the token alone: the header's `kid` picks a
  key of the issuer's JWKS, the key's type (and its `alg`, when it states one) says which
  asymmetric algorithms it may verify, and the header's `alg` must be one of those. So `none`,
  HMAC (a public key used as a shared secret) and key confusion are refused before any
  signature check.
- The JWKS is cached. A token naming a key not yet seen makes one refetch (key rotation), at
  most once a minute; the cache is also refetched when it is older than JWKS_MAX_AGE, so a
  key the IdP dropped stops verifying tokens within that time.
- Every refusal is a TokenRefused whose message starts with the check that failed
  ("aud: ...", "exp: ..."), which the enrollment service returns as it is.
"""
from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import httpx
import jwt

from .config import IdentityConfig, check_https

log = logging.getLogger("ztgate.identity")

SKEW = 60                      # seconds of clock skew allowed on exp, iat and nbf
REFETCH_UNSEEN_KID = 60        # an unseen kid refetches the JWKS at most this often
JWKS_MAX_AGE = 300             # and the cached JWKS is refetched when older than this
RETRY_UNREACHABLE = 2          # while the IdP cannot be reached, one try per this many seconds
MAX_TOKEN = 16 << 10           # bytes: an ID token is a few KiB
MAX_DOCUMENT = 1 << 20         # bytes of discovery or JWKS

RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
ALGS_OF_CURVE = {"P-256": ("ES256",), "P-384": ("ES384",), "Ed25519": ("EdDSA",), "Ed448": ("EdDSA",)}
ACCEPTED_ALGS = RSA_ALGS + ("ES256", "ES384", "EdDSA")


class TokenRefused(Exception):
    """A token failed CHECK; str() is "CHECK: why". STATUS is the enrollment service's answer:
    401 for a token that proves nothing, 403 for a proven user the gateway refuses (domain)."""

    def __init__(self, check: str, why: str, status: int = 401):
        super().__init__(f"{check}: {why}")
        self.check = check
        self.status = status


class ProviderUnavailable(Exception):
    """The IdP's discovery or keys cannot be fetched (or make no sense): no token can be checked."""


@dataclass(frozen=True)
class Identity:
    """What an accepted token says about its user."""
    issuer: str
    subject: str
    email: str
    groups: tuple
    expires: int
    claims: dict
    issued_at: int = 0          # iat: a token issued before the gateway took a login away is refused


def algorithms_of(jwk: dict) -> tuple:
    """The asymmetric algorithms this JWK may verify (empty: none of ours)."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    algs = RSA_ALGS if kty == "RSA" else ALGS_OF_CURVE.get(crv, ()) if kty in ("EC", "OKP") else ()
    if kty == "EC" and crv not in ("P-256", "P-384") or kty == "OKP" and crv not in ("Ed25519", "Ed448"):
        algs = ()
    if jwk.get("alg"):
        algs = tuple(a for a in algs if a == jwk["alg"])
    return algs


class Provider:
    """The issuer's discovery document and its JWKS, fetched over TLS and cached."""

    def __init__(self, cfg: IdentityConfig, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.clock = clock
        self.lock = threading.Lock()
        self.client = httpx.Client(verify=tls_context(cfg), timeout=5.0, follow_redirects=False,
                                   headers={"Accept": "application/json"})
        self.metadata: Optional[dict] = None
        self.keys: dict[str, tuple[jwt.PyJWK, tuple]] = {}    # kid -> (key, its algorithms)
        self.fetched = float("-inf")        # when the JWKS in `keys` was fetched
        self.tried = float("-inf")          # when a fetch was last tried (successful or not)

    def _get(self, url: str) -> dict:
        try:
            r = self.client.get(url)
        except httpx.HTTPError as e:
            raise ProviderUnavailable(f"cannot reach the identity provider at {url}: {e}") from None
        if r.status_code != 200:
            raise ProviderUnavailable(f"the identity provider answered {r.status_code} for {url}")
        if len(r.content) > MAX_DOCUMENT:
            raise ProviderUnavailable(f"{url} sent {len(r.content)} bytes (at most {MAX_DOCUMENT})")
        try:
            doc = r.json()
        except ValueError:
            raise ProviderUnavailable(f"{url} did not send JSON") from None
        if not isinstance(doc, dict):
            raise ProviderUnavailable(f"{url} did not send a JSON object")
        return doc

    def discovery(self) -> dict:
        """The issuer's OpenID configuration (fetched once: its endpoints do not move)."""
        if self.metadata is None:
            doc = self._get(self.cfg.discovery_url)
            if doc.get("issuer") != self.cfg.issuer:
                raise ProviderUnavailable(f"{self.cfg.discovery_url} names issuer {doc.get('issuer')!r}, "
                                          f"not {self.cfg.issuer!r} (OpenID discovery requires them equal)")
            url = doc.get("jwks_uri")
            why = check_https(url, "jwks_uri") if isinstance(url, str) else "names no jwks_uri"
            if why:
                raise ProviderUnavailable(f"{self.cfg.discovery_url}: {why}")
            self.metadata = doc
        return self.metadata

    def _refetch(self) -> None:
        self.tried = self.clock()
        doc = self._get(self.discovery()["jwks_uri"])
        if not isinstance(doc.get("keys"), list):
            raise ProviderUnavailable("the identity provider's JWKS has no list of keys")
        keys = {}
        for k in doc["keys"]:
            if not isinstance(k, dict) or not isinstance(k.get("kid"), str) or k.get("use", "sig") != "sig":
                continue
            algs = algorithms_of(k)
            if not algs:
                continue        # a key of a type or for an algorithm we never accept (such as "oct")
            try:
                keys[k["kid"]] = (jwt.PyJWK(k, algs[0]), algs)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
                log.warning("ignoring key %r of the identity provider's JWKS: %s", k.get("kid"), e)
        self.keys, self.fetched = keys, self.clock()
        log.info("identity provider keys: %s", ", ".join(sorted(keys)) or "none usable")

    def key(self, kid: str) -> tuple[jwt.PyJWK, tuple]:
        """The JWKS key named KID, refetching the JWKS when it is stale or KID is unseen."""
        with self.lock:
            now = self.clock()
            stale = now - self.fetched >= JWKS_MAX_AGE
            unseen = kid not in self.keys and now - self.fetched >= REFETCH_UNSEEN_KID
            if (stale or unseen) and now - self.tried >= RETRY_UNREACHABLE:
                try:
                    self._refetch()
                except ProviderUnavailable:
                    if self.fetched == float("-inf"):
                        raise
                    log.warning("keeping the identity provider's keys of %.0f s ago: refetch failed",
                                now - self.fetched, exc_info=True)
            elif self.fetched == float("-inf"):
                raise ProviderUnavailable("the identity provider's keys could not be fetched yet; try again")
            if kid not in self.keys:
                raise TokenRefused("kid", f"{kid!r} is not a signing key of the issuer's JWKS "
                                          f"(keys refetched at most once every {REFETCH_UNSEEN_KID} s)")
            return self.keys[kid]


def tls_context(cfg: IdentityConfig) -> ssl.SSLContext:
    """Trust for the IdP's certificate: ca_file when set, else the system's CAs."""
    return ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)


class Verifier:
    """Checks ID tokens of one issuer; safe to call from many threads."""

    def __init__(self, cfg: IdentityConfig, provider: Optional[Provider] = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.clock = clock
        self.provider = provider or Provider(cfg, clock)

    def verify(self, token: Any, nonce: Optional[str] = None) -> Identity:
        """The identity TOKEN proves, or TokenRefused naming the check it fails (NONCE: the
        browser login's, which the token must carry)."""
        if not isinstance(token, str) or not token:
            raise TokenRefused("token", "missing (send Authorization: Bearer <ID token>)")
        if len(token) > MAX_TOKEN:
            raise TokenRefused("token", f"{len(token)} bytes, more than an ID token ({MAX_TOKEN})")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as e:
            raise TokenRefused("jws", f"not a signed JWT: {e}") from None
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGS:
            raise TokenRefused("alg", f"{alg!r} is not accepted (only {', '.join(ACCEPTED_ALGS)})")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenRefused("kid", "the token names no key (kid) of the issuer's JWKS")
        key, algs = self.provider.key(kid)
        if alg not in algs:
            raise TokenRefused("alg", f"{alg} is not an algorithm of key {kid!r} (it is for {', '.join(algs)})")
        claims = self._decode(token, key, alg)
        return self._identity(claims, nonce)

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> dict:
        """Signature, iss, aud, exp, iat, nbf and sub, by PyJWT; each failure named."""
        try:
            return jwt.decode(token, key.key, algorithms=[alg], audience=list(self.cfg.audiences),
                              issuer=self.cfg.issuer, leeway=SKEW,
                              options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_sub": True})
        except jwt.MissingRequiredClaimError as e:
            raise TokenRefused(e.claim, "missing") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("signature", "does not verify with the issuer's key") from None
        except jwt.ExpiredSignatureError:
            raise TokenRefused("exp", f"the token has expired (more than {SKEW} s ago)") from None
        except jwt.ImmatureSignatureError as e:
            which = "nbf" if "nbf" in str(e) else "iat"
            raise TokenRefused(which, f"the token is not valid yet (more than {SKEW} s ahead)") from None
        except jwt.InvalidIssuedAtError:
            raise TokenRefused("iat", "not a number") from None
        except jwt.InvalidIssuerError:
            raise TokenRefused("iss", f"the token's issuer is not {self.cfg.issuer}") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused("aud", f"the token is not for {', '.join(self.cfg.audiences)}") from None
        except jwt.InvalidSubjectError:
            raise TokenRefused("sub", "not a string") from None
        except jwt.InvalidAlgorithmError as e:
            raise TokenRefused("alg", str(e)) from None
        except jwt.DecodeError as e:
            raise TokenRefused("jws", str(e)) from None
        except jwt.InvalidTokenError as e:      # any other check PyJWT adds in a later version
            raise TokenRefused("token", str(e) or type(e).__name__) from None

    def _identity(self, claims: dict, nonce: Optional[str]) -> Identity:
        """The checks PyJWT does not know: sub, the email, its domain, the groups, the nonce."""
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > 255:
            raise TokenRefused("sub", "must be a non-empty string of at most 255 characters")
        if nonce is not None and claims.get("nonce") != nonce:
            raise TokenRefused("nonce", "the token was not issued for this login")
        email = claims.get(self.cfg.email_claim)
        if not isinstance(email, str) or email.count("@") != 1 or not email.split("@")[0]:
            raise TokenRefused(self.cfg.email_claim, f"missing or not an email address: {email!r:.80}")
        if not email.isascii():     # Unicode case folding would make another address of it (K, U+212A: k)
            raise TokenRefused(self.cfg.email_claim, f"{email!r:.80}: only ASCII email addresses are accepted "
                                                     "(an internationalised domain in its xn-- form): give the "
                                                     "user an ASCII address or alias at the identity provider, "
                                                     "or set identity.email_claim to a claim that holds one")
        verified = claims.get("email_verified", True)
        if verified is False or isinstance(verified, str) and verified.lower() == "false":
            raise TokenRefused("email_verified", f"false: the provider has not verified {email}")
        domain = email.rsplit("@", 1)[1].lower()
        if self.cfg.allowed_domains and domain not in self.cfg.allowed_domains:
            raise TokenRefused("domain", f"{domain!r} is not an allowed domain "
                                         f"({', '.join(self.cfg.allowed_domains)})", status=403)
        return Identity(self.cfg.issuer, sub, email, self._groups(claims), int(claims["exp"]), claims,
                        int(claims["iat"]))

    def _groups(self, claims: dict) -> tuple:
        """The groups claim (a dotted path reaches a nested one): a list of strings, or absent."""
        value: Any = claims
        for part in self.cfg.groups_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
            raise TokenRefused(self.cfg.groups_claim, f"must be a list of group names, got {json.dumps(value)[:80]}")
        return tuple(dict.fromkeys(value))
