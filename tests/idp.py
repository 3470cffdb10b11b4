"""The lab's OpenID provider (lab/idp) run on loopback for tests: `running_idp(directory)` starts
`python -m lab.idp serve --listen 127.0.0.1:0 --state DIR`, waits until its discovery answers
over HTTPS, and stops it at the end (also on failure). The `idp` fixture
(tests/fixtures/idp.py) wraps it; a module that wants one provider for all its tests may use
this directly. Everything it yields is described on `Idp`.
"""
from __future__ import annotations

import contextlib
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import yaml

from lab.idp import pki
from lab.idp.admin import AdminClient
from tests.netns import REPO

USERS = {"alice@example.com": ("alice-password", ["developers", "staff"]),
         "bob@example.com": ("bob-password", ["staff"])}
START_TIMEOUT = 60.0


@dataclass
class Idp:
    """A running provider.

    issuer      https://127.0.0.1:PORT (discovery at {issuer}/.well-known/openid-configuration)
    ca_file     the CA (PEM) that signed its TLS certificate: pass it as `verify=` / `ca_file`
    client_id   "ztgate": a public client, PKCE required; redirects to loopback http (any port)
                or below https://127.0.0.1: are accepted
    passwords   {email: password} of the login form's users: alice@example.com (developers,
                staff) and bob@example.com (staff)
    state       its state directory (keys, users, CA, admin socket); removed at the end
    admin       the AdminClient on its admin socket (lab/idp/admin.py), for anything below

    token(email, groups=None, ttl=300, **claim_overrides) -> str
        An ID token signed by the current key: iss, sub (stable per user), aud=client_id, email,
        email_verified=True, groups (the user's, or `groups`), iat, exp=iat+ttl. Overrides set
        claims (e.g. email_verified=False, iss="https://other", aud="x", exp=..., nbf=...); a
        None value removes the claim (sub=None). An unknown email becomes a user (no password);
        a deprovisioned user gets none (AdminError).
    rotate(alg=None) -> kid      a new signing key (RS256, or "ES256"), in the JWKS, signing new tokens
    drop_old_keys() -> [kid]     every key but the current one leaves the JWKS
    kids() -> [kid]              the kids the JWKS holds now
    set_groups(email, groups)    the user's groups in later tokens
    deprovision(email) -> dict   the user can no longer log in or get tokens; and, if set_scim() was
                                 called, the SCIM service is told (the dict says what it answered)
    set_scim(base_url, token_file, ca_file=None)   where deprovisioning sends its SCIM PATCH
    issue_cert(address) -> (cert, key)   a TLS server certificate for an IP, from the same CA
                                         (e.g. for an enrollment service under test)
    """
    issuer: str
    ca_file: Path
    client_id: str
    passwords: dict
    state: Path
    admin: AdminClient

    def token(self, email: str, groups: Optional[list[str]] = None, ttl: int = 300, **claim_overrides) -> str:
        return self.admin.token(email, groups, ttl, claim_overrides or None)

    def rotate(self, alg: Optional[str] = None) -> str:
        return self.admin.rotate(alg)

    def drop_old_keys(self) -> list[str]:
        return self.admin.drop_old_keys()

    def kids(self) -> list[str]:
        return self.admin.keys()["kids"]

    def set_groups(self, email: str, groups: list[str]) -> dict:
        return self.admin.set_groups(email, groups)

    def deprovision(self, email: str) -> dict:
        return self.admin.deprovision(email)

    def set_scim(self, base_url: str, token_file: Path, ca_file: Optional[Path] = None) -> dict:
        return self.admin.set_scim(base_url, token_file, ca_file)

    def issue_cert(self, address: str) -> tuple[Path, Path]:
        cert, key = self.state / f"cert-{address}.pem", self.state / f"cert-{address}.key"
        pki.issue(self.ca_file, self.state / "ca.key", cert, key, [address])
        return cert, key


def _serving(state: Path, proc: subprocess.Popen) -> Optional[str]:
    issuer_file = state / "issuer"
    if proc.poll() is not None:
        raise RuntimeError(f"the IdP exited ({proc.returncode}): " + (state / "idp.log").read_text()[-2000:])
    if not issuer_file.exists():
        return None
    issuer = issuer_file.read_text().strip()
    try:
        r = httpx.get(f"{issuer}/.well-known/openid-configuration", verify=ssl.create_default_context(cafile=state / "ca.pem"), timeout=5)
        return issuer if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


@contextlib.contextmanager
def running_idp(directory: Path, extra_args: tuple[str, ...] = ()):
    """Start the provider with its state in directory/state, yield an Idp, stop it afterwards."""
    state = directory / "state"
    state.mkdir(mode=0o700, parents=True)
    users_file = directory / "users.yaml"
    users_file.write_text(yaml.safe_dump({"users": [{"email": e, "password": p, "groups": g}
                                                    for e, (p, g) in USERS.items()]}))
    log = open(state / "idp.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lab.idp", "serve", "--listen", "127.0.0.1:0", "--state",
                             str(state), "--users", str(users_file), "--redirect-prefix", "https://127.0.0.1:",
                             *extra_args], cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    admin = None
    try:
        deadline = time.time() + START_TIMEOUT
        issuer = None
        while issuer is None:
            if time.time() > deadline:
                raise RuntimeError(f"the IdP did not serve within {START_TIMEOUT:.0f} s: "
                                   + (state / "idp.log").read_text()[-2000:])
            time.sleep(0.1)
            issuer = _serving(state, proc)
        admin = AdminClient(state / "admin.sock")
        yield Idp(issuer, state / "ca.pem", "ztgate", {e: p for e, (p, _) in USERS.items()}, state, admin)
    finally:
        if admin:
            admin.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
