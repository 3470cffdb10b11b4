"""The OpenID provider's logic on Authlib's server side: one public client (`ztgate`, PKCE
required), the authorization code grant with OpenID Connect (nonce, ID token), the device
authorization grant (RFC 8628) also answering with an ID token, and the UserInfo endpoint.
Codes, device codes and access tokens live in memory (a restart logs everyone out of the
provider; ID tokens already issued stay valid until they expire, as with any IdP).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from authlib.integrations.flask_oauth2 import AuthorizationServer, ResourceProtector
from authlib.oauth2.rfc6749 import ClientMixin, InvalidRequestError, grants
from authlib.oauth2.rfc6750 import BearerTokenValidator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc8628 import DEVICE_CODE_GRANT_TYPE, DeviceAuthorizationEndpoint, DeviceCodeGrant
from authlib.oidc.core import UserInfo, UserInfoEndpoint
from authlib.oidc.core.grants import OpenIDCode, OpenIDToken

from .directory import Directory, User
from .keys import SigningKeys

SCOPES = ("openid", "email", "profile", "groups")
CODE_TTL = 120                 # an authorization code is exchanged at once or never
DEVICE_TTL = 600               # a device code waits this long for the person to approve it
DEVICE_INTERVAL = 1            # seconds between polls (RFC 8628 §3.5: faster polls get slow_down)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Client(ClientMixin):
    """The public client every ztgate component uses: no secret, PKCE, redirects to loopback
    (RFC 8252 §7.3, any port) or below one of the given https prefixes (the gateway's page)."""
    client_id: str
    redirect_prefixes: tuple[str, ...] = ()
    client_metadata: dict = field(default_factory=dict)

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return " ".join(s for s in (scope or "").split() if s in SCOPES)

    def check_redirect_uri(self, redirect_uri):
        parts = urlsplit(redirect_uri)
        if parts.scheme == "http" and parts.hostname in LOOPBACK:
            return True
        return any(redirect_uri.startswith(p) for p in self.redirect_prefixes)

    def check_client_secret(self, client_secret):
        return False

    def check_endpoint_auth_method(self, method, endpoint):
        return method == "none"

    def check_response_type(self, response_type):
        return response_type == "code"

    def check_grant_type(self, grant_type):
        return grant_type in ("authorization_code", DEVICE_CODE_GRANT_TYPE)


@dataclass
class AuthCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    email: str
    nonce: Optional[str]
    code_challenge: Optional[str]
    code_challenge_method: Optional[str]
    auth_time: int
    expires_at: float

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope

    def get_nonce(self):
        return self.nonce

    def get_auth_time(self):
        return self.auth_time

    def get_acr(self):
        return None

    def get_amr(self):
        return None


@dataclass
class DeviceCredential:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    last_poll: float = 0.0

    def get_client_id(self):
        return self.client_id

    def get_scope(self):
        return self.scope

    def get_user_code(self):
        return self.user_code

    def is_expired(self):
        return time.time() > self.expires_at


@dataclass
class AccessToken:
    access_token: str
    client: Client
    email: str
    scope: str
    expires_at: float
    provider: "Provider"

    def check_client(self, client):
        return client.get_client_id() == self.client.client_id

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return int(self.expires_at - time.time())

    def is_expired(self):
        return time.time() > self.expires_at

    def is_revoked(self):
        user = self.provider.directory.get(self.email)
        return user is None or not user.active

    def get_user(self):
        return self.provider.directory.get(self.email)

    def get_client(self):
        return self.client


class Provider:
    """Everything the HTTP side needs: the issuer, the client, keys, users and the grants' state."""

    def __init__(self, issuer: str, state: Path, users_file: Optional[Path] = None, client_id: str = "ztgate",
                 redirect_prefixes: tuple[str, ...] = (), id_token_ttl: int = 600, alg: str = "RS256"):
        self.issuer = issuer.rstrip("/")
        self.client = Client(client_id, tuple(redirect_prefixes))
        self.keys = SigningKeys(state / "keys.json", alg)
        self.directory = Directory(state / "users.json", users_file)
        self.id_token_ttl = id_token_ttl
        self.lock = threading.Lock()
        self.codes: dict[str, AuthCode] = {}
        self.devices: dict[str, DeviceCredential] = {}     # by device code
        self.approved: dict[str, str] = {}                 # user code -> email
        self.tokens: dict[str, AccessToken] = {}
        self.nonces: set[str] = set()                      # nonces already used in a code

    # -- ID tokens, shared by the flows and the admin's minting
    def claims(self, user: User, ttl: Optional[int] = None, groups: Optional[list[str]] = None) -> dict:
        now = int(time.time())
        return {"iss": self.issuer, "sub": user.sub, "aud": self.client.client_id, "email": user.email,
                "email_verified": True, "groups": list(user.groups if groups is None else groups),
                "iat": now, "exp": now + (self.id_token_ttl if ttl is None else ttl)}

    def mint(self, email: str, groups: Optional[list[str]] = None, ttl: Optional[int] = None,
             overrides: Optional[dict] = None) -> str:
        """An ID token for this user, signed by the current key. An email not known yet becomes a
        user (without a password: the form cannot log it in); a deprovisioned user gets none.
        overrides: claims to set, a None value removes the claim."""
        user = self.directory.get(email) or self.directory.add(email, groups or [])
        if not user.active:
            raise PermissionError(f"{email} is deprovisioned")
        claims = self.claims(user, ttl, groups)
        for name, value in (overrides or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return self.keys.sign(claims)

    def user_info(self, user: User) -> UserInfo:
        return UserInfo(sub=user.sub, email=user.email, email_verified=True, groups=list(user.groups))

    def approve_device(self, user_code: str, user: User) -> bool:
        with self.lock:
            known = any(d.user_code == user_code and not d.is_expired() for d in self.devices.values())
            if known:
                self.approved[user_code] = user.email
            return known

    def deprovision(self, email: str) -> User:
        """The user can no longer log in, get tokens, or use the access tokens they hold."""
        user = self.directory.deactivate(email)
        with self.lock:
            for token in [t for t, a in self.tokens.items() if a.email == email]:
                del self.tokens[token]
        return user

    def discovery(self) -> dict:
        i = self.issuer
        return {"issuer": i, "authorization_endpoint": f"{i}/authorize", "token_endpoint": f"{i}/token",
                "device_authorization_endpoint": f"{i}/device_authorization", "userinfo_endpoint": f"{i}/userinfo",
                "jwks_uri": f"{i}/jwks", "scopes_supported": list(SCOPES), "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": ["authorization_code", DEVICE_CODE_GRANT_TYPE],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": self.keys.algorithms(),
                "token_endpoint_auth_methods_supported": ["none"], "code_challenge_methods_supported": ["S256"],
                "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "email",
                                     "email_verified", "groups"]}


# ---------------------------------------------------------------------------------------------
# Authlib's grants and endpoints, bound to a Provider through the server (server.provider)

class _IdTokenSigning:
    """ID tokens of the flows: the provider's claims and current key (shared by both grants)."""
    provider: Provider

    def resolve_client_private_key(self, client):
        return self.provider.keys.current

    def get_client_algorithm(self, client):
        return self.provider.keys.current.alg

    def get_encode_header(self, client):
        key = self.provider.keys.current
        return {"alg": key.alg, "kid": key.kid, "typ": "JWT"}

    def get_client_claims(self, client):
        now = int(time.time())
        return {"iss": self.provider.issuer, "aud": client.get_client_id(), "exp": now + self.provider.id_token_ttl}

    def generate_user_info(self, user, scope):
        return self.provider.user_info(user)


class OpenIDCodeIds(_IdTokenSigning, OpenIDCode):
    def __init__(self, provider: Provider):
        super().__init__(require_nonce=True)
        self.provider = provider

    def exists_nonce(self, nonce, request):
        with self.provider.lock:
            return nonce in self.provider.nonces


class OpenIDDeviceIds(_IdTokenSigning, OpenIDToken):
    def __init__(self, provider: Provider):
        self.provider = provider


class PkceS256(CodeChallenge):
    """PKCE required at the authorization endpoint already, and only S256 (RFC 9700 §2.1.1):
    Authlib's CodeChallenge alone would let a public client's request without one through
    until the token endpoint."""
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant, redirect_uri):
        data = grant.request.payload.data
        if not data.get("code_challenge") or data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("this client must use PKCE: code_challenge with code_challenge_method S256")
        super().validate_code_challenge(grant, redirect_uri)


class CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

    def save_authorization_code(self, code, request):
        p: Provider = self.server.provider
        data = request.payload.data
        nonce = data.get("nonce")
        with p.lock:
            if nonce:
                p.nonces.add(nonce)
            p.codes[code] = AuthCode(code, request.client.get_client_id(), request.payload.redirect_uri,
                                     request.payload.scope, request.user.email, nonce, data.get("code_challenge"),
                                     data.get("code_challenge_method"), int(time.time()), time.time() + CODE_TTL)

    def query_authorization_code(self, code, client):
        p: Provider = self.server.provider
        with p.lock:
            item = p.codes.get(code)
        if item and item.client_id == client.get_client_id() and time.time() < item.expires_at:
            return item
        return None

    def delete_authorization_code(self, authorization_code):
        with self.server.provider.lock:
            self.server.provider.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code):
        user = self.server.provider.directory.get(authorization_code.email)
        return user if user and user.active else None


class DeviceGrant(DeviceCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

    def query_device_credential(self, device_code):
        with self.server.provider.lock:
            return self.server.provider.devices.get(device_code)

    def query_user_grant(self, user_code):
        p: Provider = self.server.provider
        with p.lock:
            email = p.approved.get(user_code)
        user = p.directory.get(email) if email else None
        return (user, bool(user and user.active)) if email else None

    def should_slow_down(self, credential):
        now = time.time()
        too_soon = now - credential.last_poll < DEVICE_INTERVAL * 0.8
        credential.last_poll = now
        return too_soon

    def create_token_response(self):
        result = super().create_token_response()
        p: Provider = self.server.provider
        with p.lock:        # a device code gives one token response, once
            credential = p.devices.pop(self.request.credential.device_code, None)
            if credential:
                p.approved.pop(credential.user_code, None)
        return result


class DeviceEndpoint(DeviceAuthorizationEndpoint):
    CLIENT_AUTH_METHODS = ["none"]
    EXPIRES_IN = DEVICE_TTL
    INTERVAL = DEVICE_INTERVAL

    def get_verification_uri(self):
        return f"{self.server.provider.issuer}/device"

    def save_device_credential(self, client_id, scope, data):
        p: Provider = self.server.provider
        with p.lock:
            p.devices[data["device_code"]] = DeviceCredential(data["device_code"], data["user_code"], client_id,
                                                              scope, time.time() + DEVICE_TTL)


class TokenValidator(BearerTokenValidator):
    def __init__(self, provider: Provider):
        super().__init__()
        self.provider = provider

    def authenticate_token(self, token_string):
        with self.provider.lock:
            return self.provider.tokens.get(token_string)


class UserInfoIds(UserInfoEndpoint):
    def generate_user_info(self, user, scope):
        return self.server.provider.user_info(user)

    def get_issuer(self):
        return self.server.provider.issuer


def authorization_server(app, provider: Provider) -> AuthorizationServer:
    def save_token(token, request):
        with provider.lock:
            provider.tokens[token["access_token"]] = AccessToken(
                token["access_token"], request.client, request.user.email, token.get("scope", ""),
                time.time() + int(token.get("expires_in", 3600)), provider)

    server = AuthorizationServer(app, query_client=lambda cid: provider.client if cid == provider.client.client_id
                                 else None, save_token=save_token)
    server.provider = provider
    server.scopes_supported = list(SCOPES)
    server.register_grant(CodeGrant, [PkceS256(required=True), OpenIDCodeIds(provider)])
    server.register_grant(DeviceGrant, [OpenIDDeviceIds(provider)])
    server.register_endpoint(DeviceEndpoint(server))
    protector = ResourceProtector()
    protector.register_token_validator(TokenValidator(provider))
    server.register_endpoint(UserInfoIds(server, resource_protector=protector))
    return server

