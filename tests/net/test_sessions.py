"""Sessions end to end: the real daemon, a real wireguard-go tunnel and real TCP (the site of
test_gateway.py). A device enrolled by login (the socket's session.login: what the enrollment
service does once a token is checked) loses an open connection within 1 s of its session's
end, with no packet or poll needed; a renewal gives the next connection back at once; the
expire verbs end sessions now; a gateway restart keeps sessions and their ends."""
from __future__ import annotations

import os
import time

import pytest

from control import wireguard
from control.api import Client
from control.errors import InputError
from tests.net.test_gateway import APP_WEB, LAB, Site, site  # noqa: F401 (site: the fixture)
from tests.netns import wait_until

ISSUER = "https://idp.example.com"
CUT_WITHIN = 1.0          # seconds after a session's end by which its open connections are cut


def login(site: Site, key: str, seconds: int, name: str = "carol-laptop", subject: str = "carol-sub",
          email: str = "carol@example.com") -> dict:
    with Client(site.sock) as client:
        return client.call("session.login", issuer=ISSUER, subject=subject, email=email,
                           provider_groups=["developers"], device=name, public_key=key, session_seconds=seconds)


@pytest.fixture(scope="module")
def carol(site):
    """carol logs in from the device namespace's laptop; the tunnel is up with the config the
    gateway gave (no private key in it: the device adds its own)."""
    site.ztgate("policy", "apply", LAB / "policy.yaml")
    private, public = wireguard.generate_keypair()
    got = login(site, public, 3600)
    assert got["created"] and "PrivateKey" not in got["config"] and got["addresses"][0] == "100.96.0.2"
    name = site.ns.ifname("ca")
    conf = site.tmp / f"{name}.conf"
    conf.write_text(got["config"].replace("[Interface]\n", f"[Interface]\nPrivateKey = {private}\n", 1))
    conf.chmod(0o600)
    site.ns.run("dev", "wg-quick", "up", conf, env=dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION="wireguard-go"))
    return public


def session_of(site: Site, name: str = "carol-laptop"):
    (d,) = [d for d in site.json("device", "list") if d["name"] == name]
    return d["session_expires"]


def test_expiry_cuts_an_open_connection_and_renewal_restores(site, carol):
    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=10, what="carol's first connection")
    got = login(site, carol, 4)                 # a renewal: the session now ends in 4 s
    assert not got["created"]
    expires = got["session_expires"]
    assert session_of(site) == expires
    while time.time() < expires - 0.5:         # the connection lives until its session's end
        assert site.echo(web)
        time.sleep(0.2)
    time.sleep(max(0.0, expires + CUT_WITHIN - time.time()))
    assert not site.echo(web)                   # cut: nothing of it passes either way
    assert site.tcp(APP_WEB, 8080, timeout=1) is None
    trace = site.json("trace", "--src", "100.96.0.2", "--dst", APP_WEB, "--dport", "8080")
    assert trace["kernel"]["reason"] == trace["reference"]["reason"] == "session-expired"
    dropped = wait_until(lambda: [e for e in site.logs("--device", "carol-laptop", "--limit", "500")
                                  if e["reason"] == "session-expired"], timeout=5, what="session-expired events")
    assert dropped[0]["user"] == "carol@example.com" and dropped[0]["device"] == "carol-laptop"
    assert "expired" in site.ztgate("device", "list").stdout
    # a renewal: the peer stayed, so the next connection passes at once
    login(site, carol, 3600)
    assert wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=3, what="carol after renewal")
    what = [a["what"] for a in site.json("audit", "--limit", "20")]
    assert {"login", "renewal", "session expiry"} <= set(what)


def test_refusals_change_nothing(site, carol):
    generation = site.json("status")["generation"]
    with pytest.raises(InputError, match="taken"):                       # another user, carol's name
        login(site, wireguard.generate_keypair()[1], 60, subject="dave-sub", email="dave@example.com")
    with pytest.raises(InputError, match="enrolled already"):            # carol's key, another name
        login(site, carol, 60, name="carol-phone", subject="dave-sub", email="dave@example.com")
    with pytest.raises(InputError, match="session_seconds"):
        login(site, carol, 0)
    assert site.json("status")["generation"] == generation


def test_the_expire_verbs_end_sessions_now(site, carol):
    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=5, what="a connection")
    site.ztgate("device", "expire", "carol-laptop")
    assert not site.echo(web)
    assert session_of(site) <= time.time()
    assert "nothing to change" in site.ztgate("user", "expire", "carol@example.com").stdout
    login(site, carol, 3600)
    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=3, what="carol after renewal")
    site.ztgate("user", "expire", "carol@example.com")
    assert not site.echo(web)
    login(site, carol, 3600)


def test_a_restart_keeps_sessions_and_their_ends(site, carol):
    expires = login(site, carol, 8)["session_expires"]
    site.kill()
    site.start()
    assert session_of(site) == expires
    if time.time() < expires - 1.5:             # (a slow restart may have eaten the session)
        web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=3, what="carol after the restart")
        time.sleep(max(0.0, expires + CUT_WITHIN - time.time()))
        assert not site.echo(web)               # the restarted gateway's clock ended it
    site.kill()
    site.start()                                # started after the end: expired from the first build
    assert site.tcp(APP_WEB, 8080, timeout=1) is None
    login(site, carol, 3600)
    assert wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=3, what="carol after renewal")


def call(site: Site, op: str, **args):
    with Client(site.sock) as client:
        return client.call(op, **args)


def test_provider_groups_and_deprovisioning_cut_open_connections(site, carol):
    ssh = wait_until(lambda: site.tcp(APP_WEB, 22), timeout=5, what="carol's ssh (developers)")
    assert site.echo(ssh)
    # SCIM Groups: developers has no members at the provider any more; carol's flows follow at once
    assert call(site, "provider_group.members", group="developers", emails=[])["changed"] == ["carol@example.com"]
    assert not site.echo(ssh)
    assert site.tcp(APP_WEB, 22, timeout=1) is None
    call(site, "provider_group.members", group="developers", emails=["carol@example.com", "nobody@example.com"])
    ssh = wait_until(lambda: site.tcp(APP_WEB, 22), timeout=3, what="carol's ssh, a developer again")
    # deprovisioned: her open connection ends at once, and she may not log in again
    call(site, "user.deprovision", email="carol@example.com", active=False)
    assert not site.echo(ssh)
    generation = site.json("status")["generation"]
    with pytest.raises(InputError, match="deprovisioned"):
        login(site, carol, 3600)
    assert site.json("status")["generation"] == generation
    assert [u["active"] for u in site.json("user", "list") if u["email"] == "carol@example.com"] == [False]
    assert "deprovision" in [a["what"] for a in site.json("audit", "--limit", "5")]
    # active again: her session ended with the deprovisioning, so she logs in again
    call(site, "user.deprovision", email="carol@example.com", active=True)
    assert site.tcp(APP_WEB, 22, timeout=1) is None
    login(site, carol, 3600)
    assert wait_until(lambda: site.tcp(APP_WEB, 22), timeout=3, what="carol after logging in again")


def test_scim_deactivation_and_deletion(site, carol):
    """Last: carol goes. SCIM binds her by email, deactivating her cuts her open connection at
    once, and deleting her removes her devices."""
    created = call(site, "scim.user", scim_id="scim-erin", email="erin@example.com", active=True)
    assert created["created"] and "erin@example.com" in [u["email"] for u in site.json("user", "list")]
    bound = call(site, "scim.user", scim_id="scim-carol", email="carol@example.com", external_id="c-1", active=True)
    assert not bound["created"]
    with pytest.raises(InputError, match="another SCIM user"):
        call(site, "scim.user", scim_id="scim-other", email="carol@example.com", active=True)
    web = wait_until(lambda: site.tcp(APP_WEB, 8080), timeout=5, what="carol's connection")
    assert site.echo(web)
    call(site, "scim.user", scim_id="scim-carol", email="carol@example.com", external_id="c-1", active=False)
    assert not site.echo(web)
    out = call(site, "scim.user_delete", scim_id="scim-carol")
    assert out["devices_removed"] == ["carol-laptop"]
    assert "carol-laptop" not in [d["name"] for d in site.json("device", "list")]
    assert {"scim user", "deprovision", "scim user delete"} <= {a["what"] for a in site.json("audit", "--limit", "10")}
