"""The lab's identity story end to end (spec/IDENTITY.md, "The lab"): a user the lab's IdP
provisions over SCIM logs in from a device namespace of this test's own with `ztgate login --up`
(the device authorization grant, approved by an HTTP client at the IdP's real device page and
login form); the tunnel comes up; the device reaches what its IdP groups allow and nothing
else (the reference evaluator decides, on what the gateway holds); a group removed at the IdP
changes the verdicts at the next login (a renewal); and when the IdP deprovisions the user, its
SCIM push to the gateway cuts an open TCP connection at once, and the flow log says why.

Runs on the lab (`ztgate lab up`, under the lab lock, as tests/net/test_lab.py); the device
namespace, 198.18.0.13 on the bridge, is removed afterwards, also on failure.
"""
from __future__ import annotations

import secrets
import socket
import time

import pytest

from lab import guest
from lab.idp import lab as idp_lab
from lab.lab import RUN, namespaces
from tests.lab_cli import cli_json, flow_events
from tests.lab_traffic import APP, RDP, bound, echo, http_page, open_echo, udp_echo
from tests.netns import wait_until

NS, ADDRESS = "zt-t-guest", "198.18.0.13"       # not an address of spec/LAB.md
CASES = [("tcp", APP, 22), ("tcp", APP, 8080), ("udp", APP, 5353), ("tcp", RDP, 3389)]
CUT_WITHIN = 1.0        # seconds from the IdP's deprovisioning to the open connection's end


@pytest.fixture
def device(up):
    guest.remove(NS)
    try:
        guest.add(NS, ADDRESS)
        yield NS
    finally:
        guest.remove(NS)
    assert NS not in namespaces()


def probe(me: str, proto: str, dst: str, port: int) -> tuple[bool, int]:
    """One exchange from the device with real traffic: (answered, the source port used)."""
    if proto == "udp":
        s, sport = bound(NS, socket.SOCK_DGRAM)
        return udp_echo(NS, dst, port, s), sport
    s, sport = bound(NS)
    if port == 8080:
        page = http_page(NS, dst, port, s)
        assert page in (None, f"ztgate lab app {APP}:8080, you are {me}\n")
        return page is not None, sport
    conn = open_echo(NS, dst, port, me, s=s)
    if conn:
        conn.close()
    return conn is not None, sport


def verdicts(me: str) -> dict:
    """Each case's answer, checked against the reference evaluator (control/reference.py) that
    the gateway runs on all it holds, the IdP's groups and the sessions included (`ztgate
    trace`: `identities show` has no provider groups), and against the kernel's own verdict."""
    seen = {}
    for proto, dst, port in CASES:
        reached, sport = probe(me, proto, dst, port)
        trace = cli_json("trace", "--src", me, "--dst", dst, "--proto", proto, "--sport", sport, "--dport", port)
        expected = trace["reference"]["verdict"]
        assert trace["kernel"]["verdict"] == expected, trace
        assert reached == (expected == "allow"), f"{me} {proto} {dst}:{port}: reference {trace['reference']}"
        seen[(proto, dst, port)] = reached
    return seen


def test_login_groups_renewal_and_deprovisioning(device):
    tag = secrets.token_hex(3)
    email, name = f"carol-{tag}@example.com", f"carol-{tag}"
    assert cli_json("lab", "status")["idp"]["enrollment_from_idp"]     # where the IdP's SCIM pushes go
    admin = idp_lab.admin(RUN)
    try:
        t0 = time.monotonic()
        added = admin.add_user(email, ["developers", "staff"], idp_lab.password(email))
        assert added["scim"]["sent"], added                    # the IdP provisioned her at the gateway
        got = guest.login(NS, name, email)
        assert (got["device"], got["user"], got["renewed"]) == (name, email, False)
        me = got["addresses"][0]
        assert wait_until(lambda: http_page(NS, APP, 8080), timeout=10, what="the first page through the tunnel")
        print(f"login to the first page: {time.monotonic() - t0:.1f} s")
        first = verdicts(me)
        assert first[("tcp", APP, 22)] and not first[("tcp", RDP, 3389)]

        # developers removed at the IdP: her next login (a renewal, same key) takes ssh away
        admin.set_groups(email, ["staff"])
        assert guest.login(NS, name, email)["renewed"]
        second = verdicts(me)
        assert not second[("tcp", APP, 22)] and second[("tcp", APP, 8080)]
        admin.set_groups(email, ["developers", "staff"])
        assert guest.login(NS, name, email)["renewed"]

        # deprovisioned at the IdP while an ssh connection is open: the SCIM push cuts it at once
        conn = wait_until(lambda: open_echo(NS, APP, 22, me), timeout=5, what="her ssh, a developer again")
        with conn:
            assert echo(conn)
            start = time.monotonic()
            gone = admin.deprovision(email)
            pushed = time.monotonic() - start
            assert gone["scim"]["sent"] and gone["scim"]["status"] == 200, gone
            assert not echo(conn, timeout=max(0.1, CUT_WITHIN - pushed)), "the connection outlived the SCIM push"
            print(f"deprovisioning -> SCIM push answered: {pushed * 1000:.0f} ms")
            assert pushed < CUT_WITHIN
        cut = wait_until(lambda: [e for e in flow_events("--device", name) if e["reason"] == "session-expired"],
                         timeout=5, what="the flow log's session-expired events")
        assert cut[0]["user"] == email
        assert not probe(me, "tcp", APP, 8080)[0]
    finally:
        admin.close()
