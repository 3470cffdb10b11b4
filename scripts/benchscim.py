"""SCIM deactivation -> first dropped packet of an open flow, timed with the real parts (issue 14).

Run by benchidentity.py on its gateway (the enrollment service with SCIM on, the lab's IdP
behind it) once its enrollments are timed: the device enrolled last keeps a UDP flow open
(an echo every 0.5 ms over one socket, each packet stamped with the wall clock when sent),
and the IdP's side of SCIM is played here with a real HTTPS request and the bearer token,
`PATCH /scim/v2/Users/{id}` with `active: false`, as an IdP sends it. Two clocks of the cut:

- echo: from the moment the request is sent to the first packet of the flow sent from then
  on that gets no echo (nor does any after it): what the device sees;
- flow log: to the kernel's first `session-expired` drop of that device in the gateway's flow
  log (the event's kernel time on the wall clock): when the data plane began dropping.

Between rounds the user is reactivated (`active: true`) and the device renews its session
with a fresh ID token (POST /v1/devices/{name}/session); the flow must come back.
"""
from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx

import benchecho
from tests.netns import PYTHON, Namespaces, wait_until

GOAL_MS = 100.0
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def patch_active(http: httpx.Client, url: str, token: str, uid: str, active: bool) -> httpx.Response:
    return http.patch(f"{url}/scim/v2/Users/{uid}", headers={"Authorization": f"Bearer {token}"},
                      json={"schemas": [PATCH_OP], "Operations": [{"op": "replace", "path": "active", "value": active}]})


def echo_cut_s(packets: list, sent_ns: int) -> float:
    """Seconds from SENT_NS to the first packet of the flow, sent from then on, that no echo answered
    (nor any after it). A packet sent just before whose echo came back after is dropped too, on
    its way back: it says nothing of how late the cut was, so the count starts at SENT_NS."""
    if not packets[0][1]:
        raise RuntimeError("the device's flow was not answered before the deactivation")
    last_ok = max(i for i, (_, ok) in enumerate(packets) if ok)
    if last_ok == len(packets) - 1:
        raise RuntimeError("the device's flow was not cut by the SCIM deactivation")
    first_after = next(t for t, _ in packets if t >= sent_ns)
    return (max(packets[last_ok + 1][0], first_after) - sent_ns) / 1e9


def flow_log_cut_s(flow_log: Path, device: str, sent_ns: int):
    """Seconds from SENT_NS to the device's first session-expired drop in the flow log, or None."""
    if not flow_log.exists():
        return None
    for line in flow_log.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("device") == device and e.get("reason") == "session-expired":
            at = datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()
            if at * 1e9 >= sent_ns - 1e6:        # (µs in the log: a 1 ms margin for rounding)
                return at - sent_ns / 1e9
    return None


def run(ns: Namespaces, http: httpx.Client, url: str, scim_token: str, idp, device: str, flow_log: Path,
        n: int, log) -> dict:
    """{"echo_ms": [...], "flow_log_ms": [...]}: N deactivations of the user of DEVICE (alice)."""
    auth = {"Authorization": f"Bearer {scim_token}"}
    with ns.inside("dev"):
        made = http.post(f"{url}/scim/v2/Users", headers=auth,     # the IdP provisions alice: SCIM binds her by email
                         json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                               "userName": "alice@example.com", "active": True})
    assert made.status_code == 201, made.text
    uid = made.json()["id"]
    echo, logged = [], []
    for i in range(n):
        sender = ns.popen("dev", PYTHON, *benchecho.argv(0.6, wall_clock=True, wait_answer=True),
                          stdout=subprocess.PIPE, text=True)
        if sender.stdout.readline().strip() != "up":
            raise SystemExit(f"bench: SCIM round {i}: the device's flow never answered")
        time.sleep(0.1)                          # the flow runs steadily before the IdP acts
        with ns.inside("dev"):
            sent_ns = time.time_ns()
            r = patch_active(http, url, scim_token, uid, False)
        assert r.status_code == 200 and r.json()["active"] is False, r.text
        out, _ = sender.communicate(timeout=30)
        echo.append(echo_cut_s(json.loads(out), sent_ns) * 1000)
        # the flow log is written by the daemon's pump: give it a moment
        wait_until(lambda: flow_log_cut_s(flow_log, device, sent_ns) is not None, timeout=3,
                   what="a session-expired drop in the flow log")
        logged.append(flow_log_cut_s(flow_log, device, sent_ns) * 1000)
        log(f"scim #{i + 1}: first unanswered echo {echo[-1]:+.1f} ms, flow log's first drop "
            f"{logged[-1]:+.1f} ms after the PATCH was sent")
        with ns.inside("dev"):                   # back: reactivated at the IdP, then the device renews
            assert patch_active(http, url, scim_token, uid, True).json()["active"] is True
            renewed = http.post(f"{url}/v1/devices/{device}/session",
                                headers={"Authorization": f"Bearer {idp.token('alice@example.com')}"})
        assert renewed.status_code == 200, renewed.text
    return {"echo_ms": echo, "flow_log_ms": logged}
