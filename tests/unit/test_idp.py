"""The lab's OpenID provider (lab/idp), as a client sees it: real HTTPS on loopback (httpx),
tokens checked with PyJWT against the published JWKS. No root needed."""
import base64
import hashlib
import re
import secrets
import ssl
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest

from lab.idp.admin import AdminError

REDIRECT = "http://127.0.0.1:9/callback"


def _http(idp) -> httpx.Client:
    return httpx.Client(base_url=idp.issuer, verify=ssl.create_default_context(cafile=idp.ca_file), timeout=30)


def verify(idp, token: str, **options) -> dict:
    """PyJWT against the JWKS as it is now: signature, iss, aud, exp, iat, and the claims we promise."""
    jwks = jwt.PyJWKSet.from_dict(httpx.get(f"{idp.issuer}/jwks", verify=ssl.create_default_context(cafile=idp.ca_file)).json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next((k for k in jwks.keys if k.key_id == kid), None)
    if key is None:
        raise jwt.InvalidKeyError(f"no key {kid} in the JWKS")
    return jwt.decode(token, key, algorithms=["RS256", "ES256"], audience=idp.client_id, issuer=idp.issuer,
                      options={"require": ["iss", "sub", "aud", "exp", "iat", "email"]}, **options)


def _csrf(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_discovery_and_jwks(idp):
    with _http(idp) as http:
        meta = http.get("/.well-known/openid-configuration").json()
        assert meta["issuer"] == idp.issuer
        for name, path in (("authorization_endpoint", "/authorize"), ("token_endpoint", "/token"),
                           ("device_authorization_endpoint", "/device_authorization"),
                           ("userinfo_endpoint", "/userinfo"), ("jwks_uri", "/jwks")):
            assert meta[name] == idp.issuer + path
        assert "S256" in meta["code_challenge_methods_supported"]
        assert "RS256" in meta["id_token_signing_alg_values_supported"]
        keys = http.get(meta["jwks_uri"]).json()["keys"]
    assert [k["kid"] for k in keys] == idp.kids() and keys[0]["kty"] == "RSA"
    assert all("d" not in k and "p" not in k for k in keys), "the JWKS publishes private parts"
    claims = verify(idp, idp.token("alice@example.com", ttl=60))
    assert claims["email"] == "alice@example.com" and claims["email_verified"] is True
    assert claims["groups"] == ["developers", "staff"] and claims["exp"] - claims["iat"] == 60
    assert claims["sub"] == verify(idp, idp.token("alice@example.com"))["sub"], "sub is stable"
    odd = jwt.decode(idp.token("bob@example.com", groups=["x"], email_verified=False, sub=None),
                     options={"verify_signature": False})
    assert odd["groups"] == ["x"] and odd["email_verified"] is False and "sub" not in odd


def _authorize_params(verifier: str, state: str, nonce: str) -> dict:
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return {"response_type": "code", "client_id": "ztgate", "redirect_uri": REDIRECT,
            "scope": "openid email groups", "state": state, "nonce": nonce,
            "code_challenge": challenge, "code_challenge_method": "S256"}


def test_code_flow_with_pkce_through_the_login_form(idp):
    verifier, state, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    url = "/authorize?" + urlencode(_authorize_params(verifier, state, nonce))
    with _http(idp) as http:
        form = http.get(url)
        assert form.status_code == 200 and 'type="password"' in form.text
        wrong = http.post(url, data={"csrf_token": _csrf(form.text), "email": "alice@example.com",
                                     "password": "guess"})
        assert wrong.status_code == 401 and "Wrong email or password" in wrong.text
        forged = http.post(url, data={"csrf_token": "forged", "email": "alice@example.com",
                                      "password": idp.passwords["alice@example.com"]})
        assert forged.status_code == 400, "a login without the form's CSRF token went through"
        login = http.post(url, data={"csrf_token": _csrf(wrong.text), "email": "alice@example.com",
                                     "password": idp.passwords["alice@example.com"]})
        assert login.status_code == 302
        back = urlsplit(login.headers["location"])
        query = parse_qs(back.query)
        assert f"{back.scheme}://{back.netloc}{back.path}" == REDIRECT and query["state"] == [state]
        exchange = {"grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": REDIRECT,
                    "client_id": "ztgate"}
        assert http.post("/token", data=dict(exchange, code_verifier=secrets.token_urlsafe(48))).status_code == 400
        tokens = http.post("/token", data=dict(exchange, code_verifier=verifier))
        assert tokens.status_code == 200, tokens.text
        again = http.post("/token", data=dict(exchange, code_verifier=verifier))
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant", "a code worked twice"
        info = http.get("/userinfo", headers={"Authorization": f"Bearer {tokens.json()['access_token']}"}).json()
        no_pkce = {k: v for k, v in _authorize_params(verifier, state, "n2").items() if not k.startswith("code_")}
        refused = http.get("/authorize?" + urlencode(no_pkce))
        assert refused.status_code == 400 and "code_challenge" in refused.text, "PKCE is not required"
    claims = verify(idp, tokens.json()["id_token"])
    assert claims["nonce"] == nonce and claims["email"] == "alice@example.com"
    assert claims["groups"] == ["developers", "staff"]
    assert info["sub"] == claims["sub"] and info["email"] == "alice@example.com"


def test_device_authorization_grant(idp):
    grant_type = "urn:ietf:params:oauth:grant-type:device_code"
    with _http(idp) as http:
        start = http.post("/device_authorization", data={"client_id": "ztgate", "scope": "openid email groups"})
        assert start.status_code == 200, start.text
        d = start.json()
        assert d["verification_uri"] == f"{idp.issuer}/device" and d["user_code"] in d["verification_uri_complete"]
        poll = {"grant_type": grant_type, "device_code": d["device_code"], "client_id": "ztgate"}
        assert http.post("/token", data=poll).json()["error"] == "authorization_pending"
        page = http.get(d["verification_uri_complete"])
        assert page.status_code == 200 and d["user_code"] in page.text
        approved = http.post("/device", data={"csrf_token": _csrf(page.text), "user_code": d["user_code"],
                                              "email": "bob@example.com", "password": idp.passwords["bob@example.com"]})
        assert approved.status_code == 200 and "approved for bob@example.com" in approved.text
        time.sleep(d["interval"])
        tokens = http.post("/token", data=poll)
        assert tokens.status_code == 200, tokens.text
        assert http.post("/token", data=poll).status_code == 400, "a device code gave tokens twice"
    claims = verify(idp, tokens.json()["id_token"])
    assert claims["email"] == "bob@example.com" and claims["groups"] == ["staff"]


def test_key_rotation(idp):
    old_kid = idp.kids()[0]
    old = idp.token("alice@example.com")
    new_kid = idp.rotate()
    assert idp.kids() == [old_kid, new_kid]
    new = idp.token("alice@example.com")
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    verify(idp, old), verify(idp, new)
    assert idp.drop_old_keys() == [old_kid] and idp.kids() == [new_kid]
    verify(idp, new)
    with pytest.raises(jwt.InvalidKeyError):
        verify(idp, old)
    ec_kid = idp.rotate("ES256")
    ec = idp.token("bob@example.com")
    assert jwt.get_unverified_header(ec) == {"alg": "ES256", "kid": ec_kid, "typ": "JWT"}
    assert verify(idp, ec)["email"] == "bob@example.com"


def test_groups_and_deprovisioning(idp):
    idp.set_groups("bob@example.com", ["staff", "developers"])
    assert verify(idp, idp.token("bob@example.com"))["groups"] == ["staff", "developers"]
    done = idp.deprovision("bob@example.com")
    assert done["user"]["active"] is False and done["scim"]["sent"] is False    # no SCIM target here
    with pytest.raises(AdminError):
        idp.token("bob@example.com")
    with _http(idp) as http:
        url = "/authorize?" + urlencode(_authorize_params(secrets.token_urlsafe(48), "s", "n"))
        form = http.get(url)
        refused = http.post(url, data={"csrf_token": _csrf(form.text), "email": "bob@example.com",
                                       "password": idp.passwords["bob@example.com"]})
        assert refused.status_code == 401
