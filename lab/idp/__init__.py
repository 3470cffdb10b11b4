"""The lab's OpenID Connect provider (spec/IDENTITY.md, "The lab"), built on Authlib's server
side and run as its own process over real HTTPS:

    pki.py        the CA and TLS certificates (cryptography)
    keys.py       signing keys, rotation, JWKS (joserfc)
    directory.py  users: email, password, groups, stable subject, active
    provider.py   Authlib's grants and endpoints: code + PKCE + nonce, device grant, UserInfo
    web.py        the HTTPS routes (Flask): discovery, JWKS, login form, token, device page
    admin.py      the admin channel (HTTP over a Unix socket) and its client
    scim.py       deprovisioning as a SCIM 2.0 client
    server.py     the process: `python -m lab.idp serve`
"""
