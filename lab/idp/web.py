"""The provider's HTTPS side (Flask): discovery, JWKS, the login form of the authorization
endpoint, the token endpoint, the device authorization endpoint and its verification page, and
UserInfo. The two forms carry a CSRF token (double submit: a cookie and a hidden field that
must match), so another site cannot log a browser in or approve a device on its behalf.
"""
from __future__ import annotations

import hmac
import secrets

from authlib.oauth2 import OAuth2Error
from authlib.oidc.discovery import OpenIDProviderMetadata
from flask import Flask, jsonify, render_template_string, request

from .provider import Provider, authorization_server

CSRF_COOKIE = "idp_csrf"
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ztgate lab IdP</title></head>
<body><h1>ztgate lab identity provider</h1>
{% if message %}<p id="message">{{ message }}</p>{% endif %}
{% if form %}<form method="post" action="{{ action }}">
  <input type="hidden" name="csrf_token" value="{{ csrf }}">
  {% if device %}<label>Code <input name="user_code" value="{{ user_code }}"></label><br>{% endif %}
  <label>Email <input name="email" type="email" autocomplete="username"></label><br>
  <label>Password <input name="password" type="password" autocomplete="current-password"></label><br>
  <button type="submit">{{ button }}</button>
</form>{% endif %}
</body></html>
"""


def _page(status: int = 200, message: str = "", form: bool = True, **kw):
    csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
    body = render_template_string(PAGE, message=message, form=form, csrf=csrf, **kw)
    response = Flask.response_class(body, status=status, mimetype="text/html")
    response.set_cookie(CSRF_COOKIE, csrf, secure=True, httponly=True, samesite="Strict")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"
    return response


def _csrf_ok() -> bool:
    cookie, field = request.cookies.get(CSRF_COOKIE, ""), request.form.get("csrf_token", "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), field.encode())


def create_app(provider: Provider) -> Flask:
    app = Flask("ztgate-lab-idp")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    server = authorization_server(app, provider)
    OpenIDProviderMetadata(provider.discovery()).validate()     # what we publish is valid metadata

    @app.get("/.well-known/openid-configuration")
    def discovery():
        return jsonify(provider.discovery())

    @app.get("/jwks")
    def jwks():
        return jsonify(provider.keys.jwks())

    @app.route("/authorize", methods=["GET", "POST"])
    def authorize():
        user = None
        if request.method == "POST":
            if not _csrf_ok():
                return _page(400, "This form expired: log in again.", action=request.full_path,
                             button="Log in", device=False)
            user = provider.directory.login(request.form.get("email", ""), request.form.get("password", ""))
            if user is None:
                return _page(401, "Wrong email or password.", action=request.full_path, button="Log in",
                             device=False)
        try:
            grant = server.get_consent_grant(end_user=user)
        except OAuth2Error as error:
            # a bad client or redirect: say so here, never redirect anywhere (RFC 6749 §4.1.2.1)
            return _page(400, f"{error.error}: {error.description or ''}", form=False)
        if user is None:
            return _page(action=request.full_path, button="Log in", device=False,
                         message=f"Log in to {provider.client.client_id}.")
        return server.create_authorization_response(grant_user=user, grant=grant)

    @app.post("/token")
    def token():
        return server.create_token_response()

    @app.post("/device_authorization")
    def device_authorization():
        return server.create_endpoint_response("device_authorization")

    @app.route("/device", methods=["GET", "POST"])
    def device():
        code = (request.values.get("user_code") or "").strip().upper()
        ask = dict(action="/device", button="Approve this device", device=True, user_code=code)
        if request.method == "GET":
            return _page(message="Enter the code your device shows, and log in.", **ask)
        if not _csrf_ok():
            return _page(400, "This form expired: try again.", **ask)
        user = provider.directory.login(request.form.get("email", ""), request.form.get("password", ""))
        if user is None:
            return _page(401, "Wrong email or password.", **ask)
        if not provider.approve_device(code, user):
            return _page(400, "Unknown or expired code.", **ask)
        return _page(message=f"Device approved for {user.email}: you may return to it.", form=False)

    @app.route("/userinfo", methods=["GET", "POST"])
    def userinfo():
        return server.create_endpoint_response("userinfo")

    return app
