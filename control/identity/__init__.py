"""Identity from the identity provider (issue 14; the contract is spec/IDENTITY.md).

  config.py      `identity:` in the gateway's config file
  tokens.py      ID token checks: discovery, the JWKS cache, every check named (PyJWT, httpx)
  service.py     the HTTPS enrollment service in the daemon (Starlette on uvicorn, one thread)
  http.py        what its routes share: size and rate bounds, JSON bodies, refusals
  devices.py     the API devices speak: POST /v1/devices, /v1/devices/{name}/session, /v1/oidc
  browser.py     the page: log in with the IdP (code flow, PKCE), a key pair made and shown once
  scim.py        SCIM 2.0: shared parts and Groups; scim_users.py: Users
  device.py      the device's side: `ztgate login`

What changes the gateway goes through its operations (control/gateway/sessions.py).
"""
