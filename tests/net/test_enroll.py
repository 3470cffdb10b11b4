"""The enrollment service end to end: the real daemon in a namespace with `identity:` set,
trusting the lab's real OpenID provider (its own process, in the same namespace), serving
HTTPS on 198.18.0.1:8443; a device namespace calls it like a device would.

    dev namespace (198.18.0.11)  --- veth --->  gw namespace: ztgate gateway run (zt, XDP, :8443)
                                                              lab IdP on 127.0.0.1 (loopback)

Every refusal is checked to change nothing: the store (an SQL dump) and the WireGuard peers
are compared before and after.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import signal
import sqlite3
import ssl
import subprocess
import shutil
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from control import wireguard
from tests.idp import running_idp
from tests.identity_keys import SigningKey
from tests.netns import PYTHON, REPO, Namespaces, wait_until

URL = "https://198.18.0.1:8443"
FUZZ_REQUESTS = 10_000


class Site:
    def __init__(self, ns: Namespaces, tmp: Path, idp):
        self.ns, self.tmp, self.idp = ns, tmp, idp
        self.sock = str(tmp / "ztgate.sock")
        self.iface = ns.ifname("zt")
        self.pin_dir = f"/sys/fs/bpf/ztgate-test-{ns.token}"
        cert, key = idp.issue_cert("198.18.0.1")
        self.scim_token = "scim-" + os.urandom(16).hex()
        (tmp / "scim-token").write_text(self.scim_token + "\n")
        self.config = tmp / "gateway.yaml"
        self.config.write_text(yaml.safe_dump({
            "interface": self.iface, "listen_port": 51820, "endpoint": "198.18.0.1:51820",
            "routes": ["10.20.0.0/16"], "state_dir": str(tmp / "state"), "socket": self.sock,
            "flow_log": str(tmp / "flows.log"), "metrics": None, "bpf_pin_dir": self.pin_dir,
            "identity": {"issuer": idp.issuer, "client_id": idp.client_id, "ca_file": str(idp.ca_file),
                         "allowed_domains": ["example.com"], "session": "1h", "listen": "198.18.0.1:8443",
                         "tls_cert": str(cert), "tls_key": str(key), "scim_token_file": str(tmp / "scim-token"),
                         "rate_limit": 100_000}}))
        self.stderr = tmp / "daemon.stderr"
        self.daemon = None
        self.tls = ssl.create_default_context(cafile=str(idp.ca_file))
        self.http = httpx.Client(verify=self.tls, timeout=30)

    def start(self) -> None:
        t0 = time.monotonic()
        self.daemon = self.ns.popen("gw", PYTHON, "-m", "control.cli", "gateway", "run", "--config", self.config,
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.stderr, "a"))
        wait_until(lambda: self.daemon.poll() is not None or self._answers(), timeout=60, what="the gateway")
        assert self.daemon.poll() is None, self.stderr.read_text()[-3000:]
        self.started_in = time.monotonic() - t0

    def _answers(self) -> bool:
        try:
            return self.call("GET", "/").status_code == 200
        except httpx.HTTPError:
            return False

    def ztgate(self, *args) -> subprocess.CompletedProcess:
        r = subprocess.run([PYTHON, "-m", "control.cli", *map(str, args), "--socket", self.sock], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    def call(self, method: str, path: str, token: str | None = None, body=None, content=None, ns: str = "dev",
             client: httpx.Client | None = None, **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        if token:                       # "" sends none (httpx refuses a header value ending in a space)
            headers["Authorization"] = f"Bearer {token}"
        with self.ns.inside(ns):
            return (client or self.http).request(method, URL + path, json=body, content=content, headers=headers, **kw)

    def scim(self, method: str, path: str, body=None, token: str | None = None) -> httpx.Response:
        return self.call(method, "/scim/v2" + path, token=token or self.scim_token, body=body)

    def snapshot(self) -> tuple:
        """What a refusal must not change: the store, whole, and the interface's peers."""
        db = sqlite3.connect(f"file:{self.tmp / 'state' / 'ztgate.db'}?mode=ro", uri=True)
        try:
            dump = list(db.iterdump())
        finally:
            db.close()
        peers = sorted(self.ns.run("gw", "wg", "show", self.iface, "allowed-ips").stdout.splitlines())   # (any order)
        return dump, peers


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enroll")
    os.chmod(tmp, 0o755)
    idp_dir = Path(tempfile.mkdtemp(prefix="ztgate-idp-"))
    with Namespaces("zten") as ns:
        ns.add("gw")
        ns.add("dev")
        ns.veth("gw", "dev", "198.18.0.1/24", "198.18.0.11/24")
        with ns.inside("gw"):      # the IdP process and its readiness checks live in gw's namespace
            idp_cm = running_idp(idp_dir, ("--redirect-prefix", f"{URL}/"))
            idp = idp_cm.__enter__()
        s = Site(ns, tmp, idp)
        try:
            s.start()
            yield s
        finally:
            if s.daemon and s.daemon.poll() is None:
                s.daemon.send_signal(signal.SIGTERM)
                s.daemon.wait(timeout=10)
            ns.run("gw", PYTHON, "-m", "control.cli", "gateway", "teardown", "--config", s.config, cwd=REPO,
                   check=False, timeout=30)
            subprocess.run(["rm", "-rf", s.pin_dir])
            idp_cm.__exit__(None, None, None)
            shutil.rmtree(idp_dir, ignore_errors=True)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key() -> str:
    return wireguard.generate_keypair()[1]


def test_enroll_renew_and_the_device_list(site):
    assert site.started_in < 30
    key = new_key()
    r = site.call("POST", "/v1/devices", site.idp.token("alice@example.com"), {"name": "alice-laptop", "public_key": key})
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["device"] == "alice-laptop" and out["addresses"] == ["100.96.0.2", "fd00:5a::2"]
    assert "PrivateKey" not in out["config"] and "Address = 100.96.0.2/32" in out["config"]
    assert 3500 < out["session_expires"] - time.time() <= 3600
    again = site.call("POST", "/v1/devices", site.idp.token("alice@example.com"), {"name": "alice-laptop", "public_key": key})
    assert again.status_code == 200 and again.json()["session_expires"] >= out["session_expires"]
    renewed = site.call("POST", "/v1/devices/alice-laptop/session", site.idp.token("alice@example.com"))
    assert renewed.status_code == 200, renewed.text
    devices = json.loads(site.ztgate("device", "list", "--json").stdout)
    mine = [d for d in (devices if isinstance(devices, list) else devices["devices"]) if d["name"] == "alice-laptop"]
    assert mine and mine[0]["user"] == "alice@example.com"
    assert key in site.ns.run("gw", "wg", "show", site.iface, "peers").stdout


def test_every_refusal_names_its_reason_and_changes_nothing(site):
    key = new_key()
    site.call("POST", "/v1/devices", site.idp.token("alice@example.com"), {"name": "alice-phone", "public_key": key})
    before = site.snapshot()
    idp, now = site.idp, int(time.time())
    good = idp.token("alice@example.com")
    header, claims = jwt.get_unverified_header(good), jwt.decode(good, options={"verify_signature": False})
    other = SigningKey(header["alg"])
    enroll = {"name": "mallory-box", "public_key": new_key()}
    with site.ns.inside("gw"):
        jwks = httpx.get(f"{idp.issuer}/jwks", verify=site.tls).json()["keys"]
    public = jwt.PyJWK(next(k for k in jwks if k["kid"] == header["kid"])).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': header['kid']}).encode())}.{good.split('.')[1]}"
    hs256 = signing_input + "." + b64(hmac.new(public, signing_input.encode(), hashlib.sha256).digest())
    cases = [
        (hs256, 401, "alg"),            # the provider's public key as an HMAC secret (key confusion)
        (jwt.encode(claims, other.key, header["alg"], headers={"kid": header["kid"]}), 401, "signature"),
        (jwt.encode(claims, other.key, header["alg"], headers={"kid": other.kid}), 401, "kid"),
        (jwt.encode(claims, None, "none"), 401, "alg"),
        (idp.token("alice@example.com", ttl=-300), 401, "exp"),
        (idp.token("alice@example.com", nbf=now + 600), 401, "nbf"),
        (idp.token("alice@example.com", iss="https://evil.example.com"), 401, "iss"),
        (idp.token("alice@example.com", aud="other-client"), 401, "aud"),
        (idp.token("alice@example.com", email_verified=False), 401, "email_verified"),
        (idp.token("mallory@evil.example.org"), 403, "domain"),
        ("", 401, "token"),
    ]
    for token, status, check in cases:
        r = site.call("POST", "/v1/devices", token, enroll)
        assert (r.status_code, r.json()["error"].split(":")[0]) == (status, check), r.text
    bob = idp.token("bob@example.com")
    assert site.call("POST", "/v1/devices/alice-phone/session", bob).status_code == 404      # not bob's device
    assert site.call("POST", "/v1/devices", bob, {"name": "alice-phone", "public_key": new_key()}).status_code == 409
    assert site.call("POST", "/v1/devices", bob, {"name": "bob-laptop", "public_key": key}).status_code == 409
    for body, status in ((b'{"name": "x", "public_k', 400), (b"[]", 400), (b"\xff\xfe", 400),
                         (json.dumps({"name": "Bad Name", "public_key": new_key()}).encode(), 400),
                         (json.dumps({"name": "ok", "public_key": "short"}).encode(), 400),
                         (json.dumps(dict(enroll, extra=1)).encode(), 400),
                         (b'{"name": "' + b"a" * (1 << 20) + b'"}', 413)):
        r = site.call("POST", "/v1/devices", good, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status and r.json()["error"], (body[:40], r.status_code, r.text[:200])
    assert site.call("POST", "/v1/devices/alice-phone/session", good, {"x": 1}).status_code == 400
    assert site.call("GET", "/v1/devices").status_code == 405
    assert site.call("GET", "/nowhere").json()["status"] == 404
    assert site.snapshot() == before


def test_browser_login_enrolls_once_and_its_state_is_single_use(site):
    """The page's flow with the IdP's real login form (an HTTP client as the browser, in gw,
    where both the IdP and the service are reachable): PKCE, state, nonce; the config shown once."""
    browser = httpx.Client(verify=site.tls, timeout=30)
    start = site.call("GET", "/login", ns="gw", client=browser)
    assert start.status_code == 302
    where = urllib.parse.urlsplit(start.headers["location"])
    q = dict(urllib.parse.parse_qsl(where.query))
    assert q["code_challenge_method"] == "S256" and q["state"] and q["nonce"] and q["redirect_uri"] == f"{URL}/callback"
    with site.ns.inside("gw"):
        form = browser.get(start.headers["location"])
        csrf = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        done = browser.post(start.headers["location"], data={"csrf_token": csrf, "email": "bob@example.com",
                                                              "password": site.idp.passwords["bob@example.com"]})
    assert done.status_code == 302 and done.headers["location"].startswith(f"{URL}/callback?")
    callback = done.headers["location"][len(URL):]
    logged = site.call("GET", callback, ns="gw", client=browser)
    assert logged.status_code == 303, logged.text
    # the same state again (a replayed redirect): refused, and nothing changes
    before = site.snapshot()
    replay = site.call("GET", callback, ns="gw", client=browser)
    assert replay.status_code == 400 and "state: unknown, expired or already used" in replay.text
    assert site.call("GET", "/callback?state=made-up&code=x", ns="gw", client=browser).status_code == 400
    page = site.call("GET", "/", ns="gw", client=browser)
    assert "bob@example.com" in page.text
    token = page.text.split("name=csrf value='")[1].split("'")[0]
    forged = site.call("POST", "/enroll", ns="gw", client=browser, data={"name": "bob-phone", "csrf": "forged"})
    assert forged.status_code == 403
    stranger = site.call("POST", "/enroll", ns="gw", data={"name": "bob-phone", "csrf": token})   # no cookie
    assert stranger.status_code == 401
    assert site.snapshot() == before
    shown = site.call("POST", "/enroll", ns="gw", client=browser, data={"name": "bob-phone", "csrf": token})
    assert shown.status_code == 200 and shown.headers["cache-control"] == "no-store"
    assert "PrivateKey = " in shown.text and "<svg" in shown.text
    private = shown.text.split("PrivateKey = ")[1].split("\n")[0]
    assert wireguard.public_key_of(private) in site.ns.run("gw", "wg", "show", site.iface, "peers").stdout
    assert private.encode() not in (site.tmp / "state" / "ztgate.db").read_bytes()
    again = site.call("POST", "/enroll", ns="gw", client=browser, data={"name": "bob-phone", "csrf": token})
    assert again.status_code == 409            # shown once: the name is taken, by a key nobody here holds


def test_scim_users_and_groups(site):
    tablet = site.call("POST", "/v1/devices", site.idp.token("alice@example.com"),
                       {"name": "alice-tablet", "public_key": new_key()})
    assert tablet.status_code == 201, tablet.text
    assert site.scim("GET", "/Users", token="wrong").status_code == 401
    assert site.scim("GET", "/ServiceProviderConfig").json()["patch"] == {"supported": True}
    assert site.call("GET", "/scim/v2/Users").json()["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    made = site.scim("POST", "/Users", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                        "userName": "carol@example.com", "externalId": "c-1", "active": True})
    assert made.status_code == 201, made.text
    carol = made.json()["id"]
    assert site.scim("POST", "/Users", {"userName": "carol@example.com"}).status_code == 409
    assert site.scim("GET", f"/Users/{carol}").json()["userName"] == "carol@example.com"
    found = site.scim("GET", '/Users?filter=userName%20eq%20%22carol@example.com%22').json()
    assert found["totalResults"] == 1 and found["Resources"][0]["id"] == carol
    assert site.scim("GET", '/Users?filter=name%20co%20%22x%22').status_code == 400
    # alice (enrolled by her token) provisioned by SCIM, then deactivated: her sessions end
    alice = site.scim("POST", "/Users", {"userName": "alice@example.com", "active": True}).json()["id"]
    off = site.scim("PATCH", f"/Users/{alice}", {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                                                 "Operations": [{"op": "replace", "path": "active", "value": False}]})
    assert off.status_code == 200 and off.json()["active"] is False
    r = site.call("POST", "/v1/devices/alice-tablet/session", site.idp.token("alice@example.com"))
    assert r.status_code == 403 and "deprovisioned" in r.json()["error"]
    on = site.scim("PATCH", f"/Users/{alice}", {"Operations": [{"op": "replace", "value": {"active": "True"}}]})
    assert on.json()["active"] is True
    assert site.call("POST", "/v1/devices/alice-tablet/session", site.idp.token("alice@example.com")).status_code == 200
    # groups: members by SCIM id
    g = site.scim("POST", "/Groups", {"displayName": "scim-ops", "members": [{"value": carol}]})
    assert g.status_code == 201, g.text
    gid = g.json()["id"]
    patch = lambda *ops: site.scim("PATCH", f"/Groups/{gid}", {"Operations": list(ops)})  # noqa: E731
    members = lambda r: sorted(m["value"] for m in r.json()["members"])  # noqa: E731
    assert members(patch({"op": "add", "path": "members", "value": [{"value": alice}]})) == sorted([carol, alice])
    assert members(patch({"op": "remove", "path": f'members[value eq "{carol}"]'})) == [alice]
    assert members(patch({"op": "replace", "path": "members", "value": [{"value": carol}]})) == [carol]
    assert patch({"op": "add", "path": "members", "value": [{"value": "nobody"}]}).status_code == 400
    users = json.loads(site.ztgate("user", "list", "--json").stdout)
    rows = users if isinstance(users, list) else users["users"]
    assert "scim-ops" in json.dumps([u for u in rows if u["email"] == "carol@example.com"])
    put = site.scim("PUT", f"/Groups/{gid}", {"displayName": "scim-admins", "members": [{"value": alice}]})
    assert put.json()["displayName"] == "scim-admins" and members(put) == [alice]
    assert site.scim("GET", '/Groups?filter=displayName%20eq%20%22scim-admins%22').json()["totalResults"] == 1
    assert site.scim("DELETE", f"/Groups/{gid}").status_code == 204
    assert site.scim("GET", f"/Groups/{gid}").status_code == 404
    assert site.scim("PUT", f"/Users/{carol}", {"userName": "carol@example.com", "active": False}).json()["active"] is False
    assert site.scim("DELETE", f"/Users/{carol}").status_code == 204
    assert site.scim("GET", f"/Users/{carol}").status_code == 404


def fuzz_request(rng: random.Random, bad_tokens: list[str], scim_token: str) -> tuple:
    """(method, path, headers, body) of one hostile request."""
    path, methods = rng.choice([
        ("/v1/devices", "POST"), ("/v1/devices/alice-laptop/session", "POST"), ("/v1/devices/%2e%2e/session", "POST"),
        ("/v1/devices/" + "a" * 70 + "/session", "POST"), ("/scim/v2/Users", "GET POST"),
        ("/scim/v2/Users/x", "GET PUT PATCH"), ("/scim/v2/Groups", "GET POST"), ("/scim/v2/Groups/x", "GET PUT PATCH"),
        ("/", "GET"), ("/callback?state=" + "A" * rng.randint(0, 300), "GET"), ("/enroll", "POST"),
        ("/login", "POST")])
    method = rng.choice(methods.split()) if rng.random() < 0.9 else rng.choice(["PUT", "DELETE", "OPTIONS"])
    token = rng.choice(bad_tokens)
    if path.startswith("/scim") and rng.random() < 0.3:
        token = scim_token if method in ("GET", "POST", "PATCH", "PUT") else token
    headers = {"Authorization": f"Bearer {token}"} if token and rng.random() < 0.9 else {}
    kind = rng.randrange(5)
    if kind == 0:
        body = rng.randbytes(rng.randint(0, 512))
    elif kind == 1:
        body = json.dumps({"name": rng.choice(["x", "", "a" * 80, None, 5]),
                           "public_key": rng.choice([new_key()[:-1], "", None, "=" * 44])}).encode()
    elif kind == 2:
        body = json.dumps(rng.choice([[], {}, None, 1, "s", {"Operations": [{"op": "x"}]}, {"userName": 7}])).encode()
    elif kind == 3:
        body = json.dumps({"name": "alice-laptop", "public_key": new_key()})[:rng.randint(0, 60)].encode()
    else:
        body = b""
    return method, path, headers, body


def test_fuzzed_requests_change_nothing(site):
    """10^4 hostile requests (bad tokens, garbage and truncated bodies, wrong methods; SCIM with
    its token but garbage): every answer a 4xx error that says why (or a read's 200), the daemon
    up, nothing changed."""
    idp = site.idp
    good = idp.token("alice@example.com")
    bad_tokens = [good[:-1] + ("A" if good[-1] != "A" else "B"), good[: len(good) // 2], "x" * 100, "",
                  idp.token("alice@example.com", ttl=-300), idp.token("alice@example.com", aud="x"),
                  jwt.encode({"sub": "x"}, None, "none"), "a.b.c", good.replace(".", "..", 1)]
    before = site.snapshot()
    rng = random.Random(14)
    requests = [fuzz_request(rng, bad_tokens, site.scim_token) for _ in range(FUZZ_REQUESTS)]
    statuses: dict[int, int] = {}

    def worker(chunk):
        with site.ns.inside("dev"):
            client = httpx.Client(verify=site.tls, timeout=30)
            seen = []
            for method, path, headers, body in chunk:
                r = client.request(method, URL + path, headers=headers, content=body)
                assert r.status_code < 500, (method, path, body[:80], r.status_code, r.text[:300])
                if r.status_code >= 400 and r.headers["content-type"].startswith("text/html"):
                    assert "id=error" in r.text, r.text[:300]          # the page's routes answer a page
                elif r.status_code >= 400:
                    assert r.json().get("error") or r.json().get("detail"), r.text[:200]
                seen.append(r.status_code)
            client.close()
            return seen
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        for seen in pool.map(worker, [requests[i::4] for i in range(4)]):
            for s in seen:
                statuses[s] = statuses.get(s, 0) + 1
    took = time.monotonic() - t0
    print(f"fuzz: {FUZZ_REQUESTS} requests in {took:.1f} s: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) == FUZZ_REQUESTS and all(400 <= s < 500 or s == 200 for s in statuses)
    assert site.daemon.poll() is None
    assert site.snapshot() == before


def approve(site, browser: httpx.Client, url: str, email: str, code: str | None = None) -> httpx.Response:
    """A person at the IdP's form (a login, or a device code to approve), as a browser in gw."""
    with site.ns.inside("gw"):
        form = browser.get(url)
        csrf = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        data = {"csrf_token": csrf, "email": email, "password": site.idp.passwords[email]}
        if code is not None:
            data["user_code"] = code
        return browser.post(url if code is None else url.split("?")[0], data=data)


def login_cli(site, config: Path, *flags) -> subprocess.Popen:
    """`ztgate login` on a machine that reaches both the gateway and the IdP (gw's namespace)."""
    return site.ns.popen("gw", PYTHON, "-m", "control.cli", "login", "--gateway", URL, "--ca", site.idp.ca_file,
                         "--config", config, "--json", *flags, cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)


def test_ztgate_login_by_device_grant_and_by_code_flow_then_renews(site):
    config = site.tmp / "dave-laptop.conf"
    for run in range(2):                       # the second run renews with the same key
        cli = login_cli(site, config, "--name", "dave-laptop", "--flow", "device")
        line = cli.stderr.readline()
        assert line.startswith("To log in, open "), line + cli.stderr.read()
        url, code = line.split("open ")[1].split(" and enter the code ")
        approved = approve(site, httpx.Client(verify=site.tls), url, "alice@example.com", code.strip())
        assert "approved" in approved.text, approved.text
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, err
        answer = json.loads(out)
        assert (answer["device"], answer["user"], answer["renewed"]) == ("dave-laptop", "alice@example.com", run == 1)
        assert config.stat().st_mode & 0o777 == 0o600
        private = config.read_text().split("PrivateKey = ")[1].split("\n")[0]
        assert wireguard.public_key_of(private) in site.ns.run("gw", "wg", "show", site.iface, "peers").stdout
    # the code flow with PKCE and a loopback redirect (the browser runs on the same machine)
    cli = login_cli(site, site.tmp / "bob.conf", "--name", "bob-desktop", "--flow", "code")
    assert cli.stderr.readline().startswith("To log in, open this URL")
    url = cli.stderr.readline().strip()
    assert "code_challenge_method=S256" in url and "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
    browser = httpx.Client(verify=site.tls)
    back = approve(site, browser, url, "bob@example.com")
    assert back.status_code == 302 and back.headers["location"].startswith("http://127.0.0.1:")
    with site.ns.inside("gw"):
        assert httpx.get(back.headers["location"]).status_code == 200
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert json.loads(out)["user"] == "bob@example.com"


def test_the_page_in_headless_chromium(site, monkeypatch):
    """A person with a real browser (Debian's Chromium, headless, driven over WebDriver by
    Selenium and Debian's chromedriver), in gw where it reaches the page and the IdP: log in
    at the IdP, enroll a phone, see its configuration and QR code once."""
    if shutil.which("chromedriver") is None and os.environ.get("CI") != "true":
        pytest.skip("needs chromium and chromium-driver (scripts/setup installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={site.tmp / 'chromium'}"):
        options.add_argument(flag)
    options.accept_insecure_certs = True       # the lab CA is not in Chromium's store (TLS is checked above)
    monkeypatch.setenv("SE_OFFLINE", "true")   # Selenium must not look for drivers online
    with site.ns.inside("gw"):                 # chromedriver, Chromium and the WebDriver connection live in gw
        browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            browser.set_page_load_timeout(30)
            # find_element waits for its element: a click's navigation (IdP, redirect, the
            # gateway's callback) may still be under way on a loaded host
            browser.implicitly_wait(20)
            browser.get(URL + "/")
            browser.find_element(By.ID, "login").click()
            assert browser.current_url.startswith(site.idp.issuer)
            browser.find_element(By.NAME, "email").send_keys("alice@example.com")
            browser.find_element(By.NAME, "password").send_keys(site.idp.passwords["alice@example.com"])
            browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            assert browser.find_element(By.ID, "who").text == "alice@example.com"
            browser.find_element(By.ID, "name").send_keys("alice-phone-2")
            browser.find_element(By.ID, "enroll").click()
            config = browser.find_element(By.ID, "config").text
            assert "PrivateKey = " in config and "Endpoint = 198.18.0.1:51820" in config
            assert browser.find_element(By.CSS_SELECTOR, "#qr svg").size["width"] > 100
            browser.save_screenshot(str(site.tmp / "enrolled.png"))     # (kept with the test's files, to look at)
            private = config.split("PrivateKey = ")[1].split("\n")[0]
            assert wireguard.public_key_of(private) in site.ns.run("gw", "wg", "show", site.iface, "peers").stdout
            browser.get(URL + "/")                  # shown once: the page is the form again
            assert "PrivateKey" not in browser.page_source and browser.find_element(By.ID, "name")
        finally:
            browser.quit()
