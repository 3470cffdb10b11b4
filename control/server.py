"""The gateway's Unix socket: who may connect, what a request may hold, and the answer.

The socket is mode 0660, owned by root and the operators' group; the peer's credentials
(SO_PEERCRED) are checked again on every connection, so a socket made reachable by mistake
still refuses strangers. Requests are checked against OPS before anything runs: an unknown
op, a missing or unknown argument or a wrong type gets an error reply naming it and changes
nothing. A frame that cannot be read (oversized, truncated, not msgpack) gets an error reply
if one can still be sent, and the connection is closed; the daemon goes on.
"""
from __future__ import annotations

import grp
import logging
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any, Callable

from .api import FrameError, read_frame, write_frame
from .errors import InputError, ZtError

log = logging.getLogger("ztgate.server")
IDLE_SECONDS = 600            # a connection that sends nothing for this long is closed
MAX_CONNECTIONS = 64

# op -> (handler name on Gateway/Daemon, {arg: (type, required)}, changes state)
_S, _I, _B, _D, _L = str, int, bool, dict, list
OPS: dict[str, tuple[str, dict, bool]] = {
    "status": ("status", {}, False),
    "policy.show": ("policy_show", {}, False),
    "identities.show": ("identities_show", {}, False),
    "policy.apply": ("policy_apply", {"policy_text": (_S, True), "policy_name": (_S, True),
                                      "identities_text": (_S, False), "identities_name": (_S, False),
                                      "dry_run": (_B, False)}, True),
    "rule.list": ("rule_list", {}, False),
    "rule.add": ("rule_add", {"rule": (_D, True)}, True),
    "rule.remove": ("rule_remove", {"name": (_S, True)}, True),
    "rule.set_enabled": ("rule_set_enabled", {"name": (_S, True), "enabled": (_B, True)}, True),
    "rule.move": ("rule_move", {"name": (_S, True), "precedence": (_I, False), "before": (_S, False),
                                "after": (_S, False)}, True),
    "user.list": ("user_list", {}, False),
    "user.add": ("user_add", {"email": (_S, True), "groups": (_L, False)}, True),
    "user.remove": ("user_remove", {"email": (_S, True), "with_devices": (_B, False)}, True),
    "group.list": ("group_list", {}, False),
    "group.add": ("group_add", {"name": (_S, True)}, True),
    "group.remove": ("group_remove", {"name": (_S, True)}, True),
    "group.member": ("group_member", {"group": (_S, True), "email": (_S, True), "present": (_B, True)}, True),
    "device.list": ("device_list", {}, False),
    "device.add": ("device_add", {"name": (_S, True), "email": (_S, True), "public_key": (_S, False)}, True),
    "device.set_enabled": ("device_set_enabled", {"name": (_S, True), "enabled": (_B, True)}, True),
    "device.remove": ("device_remove", {"name": (_S, True)}, True),
    "flows": ("flows", {"user": (_S, False), "device": (_S, False), "limit": (_I, False)}, False),
    "flows.kill": ("flows_kill", {"proto": (_S, True), "src": (_S, True), "sport": (_I, True), "dst": (_S, True),
                                  "dport": (_I, True)}, True),
    "flows.kill_of": ("flows_kill_of", {"user": (_S, False), "device": (_S, False)}, True),
    "connector.list": ("connector_list", {}, False),
    "connector.add": ("connector_add", {"name": (_S, True), "listen_port": (_I, False)}, True),
    "connector.remove": ("connector_remove", {"name": (_S, True)}, True),
    "route.list": ("route_list", {}, False),
    "route.add": ("route_add", {"prefix": (_S, True), "connector": (_S, True)}, True),
    "route.remove": ("route_remove", {"prefix": (_S, True)}, True),
    "audit": ("audit", {"limit": (_I, False)}, False),
    "trace": ("trace", {"packet": (_D, True)}, False),
    "dns.list": ("dns_list", {"name": (_S, False)}, False),      # the DNS slow path (control/dns)
    "logs": ("logs", {"cursor": (_L, False), "user": (_S, False), "verdict": (_S, False),
                      "device": (_S, False), "limit": (_I, False)}, False),
    # sessions (spec/IDENTITY.md): the verbs, and login and renewal as the enrollment service
    # and SCIM call them (on the socket for operators' scripts and the tests: no token is checked
    # here; whole seconds here)
    "device.expire": ("device_expire", {"name": (_S, True)}, True),
    "user.expire": ("user_expire", {"email": (_S, True)}, True),
    "session.login": ("login", {"issuer": (_S, True), "subject": (_S, True), "email": (_S, True),
                                "provider_groups": (_L, True), "device": (_S, True), "public_key": (_S, True),
                                "session_seconds": (_I, True)}, True),
    "session.renew": ("renew", {"issuer": (_S, True), "subject": (_S, True), "email": (_S, True),
                                "provider_groups": (_L, True), "device": (_S, True),
                                "session_seconds": (_I, True)}, True),
    "user.deprovision": ("deprovision", {"email": (_S, True), "active": (_B, True)}, True),
    "provider_group.members": ("provider_group_members", {"group": (_S, True), "emails": (_L, True)}, True),
    "scim.user": ("scim_user", {"scim_id": (_S, True), "email": (_S, True), "external_id": (_S, False),
                                "active": (_B, True)}, True),
    "scim.user_delete": ("scim_user_delete", {"scim_id": (_S, True)}, True),
}
DEFAULTS = {"dry_run": False, "with_devices": False, "limit": 50, "listen_port": None}


def check_request(req: Any) -> tuple[str, dict, bool]:
    """(handler name, arguments, changes state) of a well-formed request; else InputError."""
    if not isinstance(req, dict):
        raise InputError(f"a request is a map with op and args, got {type(req).__name__}")
    unknown = [k for k in req if k not in ("op", "args")]
    if unknown:
        raise InputError(f"request: unknown key {unknown[0]!r} (a request has op and args)")
    op = req.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise InputError(f"request: unknown op {op!r} (known: {', '.join(sorted(OPS))})")
    args = req.get("args", {})
    if not isinstance(args, dict):
        raise InputError(f"{op}: args must be a map, got {type(args).__name__}")
    handler, schema, changes = OPS[op]
    for key, value in args.items():
        if key not in schema:
            raise InputError(f"{op}: unknown argument {key!r} (allowed: {', '.join(schema) or 'none'})")
        kind, _ = schema[key]
        if value is None and not schema[key][1]:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(f"{op}: {key} must be {kind.__name__}, got {type(value).__name__}")
    for key, (kind, required) in schema.items():
        if required and args.get(key) is None:
            raise InputError(f"{op}: {key} is required")
    out = {k: args[k] if args.get(k) is not None else DEFAULTS.get(k) for k in schema}
    if "limit" in out and not 1 <= out["limit"] <= 100000:
        raise InputError(f"{op}: limit must be from 1 to 100000")
    cursor = out.get("cursor")
    if cursor is not None and (len(cursor) != 2 or not all(isinstance(c, int) and not isinstance(c, bool)
                                                            and 0 <= c < 2**64 for c in cursor)):
        raise InputError(f"{op}: cursor must be the [inode, offset] a previous reply gave")
    if op == "user.add" and not all(isinstance(g, str) for g in out["groups"] or []):
        raise InputError("user.add: groups must be a list of names")
    if op == "user.add":
        out["groups"] = out["groups"] or []
    return handler, out, changes


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)   # pid, uid, gid


SO_PEERGROUPS = 59          # Linux >= 4.13; Python's socket module does not name it
GROUPS_BUF = 1024           # 256 groups: the most getsockopt() hands Python (a larger list: ERANGE)


def peer_groups(sock: socket.socket) -> set[int]:
    """The peer's supplementary groups as they were when it connected (SO_PEERGROUPS), not as
    /proc/PID says later: by then that PID may be another process. A peer in more than 256
    groups gets none counted (its primary group still counts)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, GROUPS_BUF)
    except OSError:
        return set()
    return set(struct.unpack(f"{len(raw) // 4}I", raw))


class Server:
    def __init__(self, path: str, group: str, target: Any):
        """target: the object whose methods OPS name (the daemon)."""
        self.path, self.target = path, target
        try:
            self.gid = grp.getgrnam(group).gr_gid
        except KeyError:
            self.gid = None
            log.warning("group %r does not exist: only root may use %s", group, path)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if os.path.exists(path):
            os.unlink(path)   # a socket left by a controller that was killed
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.serve_connection(self.request)

        class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        umask = os.umask(0o117)   # the socket is never, even for a moment, open to others
        try:
            self.server = _Server(path, Handler)
        finally:
            os.umask(umask)
        os.chmod(path, 0o660)
        os.chown(path, 0, self.gid if self.gid is not None else 0)

    def allowed(self, conn: socket.socket, uid: int, gid: int) -> bool:
        return uid == 0 or (self.gid is not None and (gid == self.gid or self.gid in peer_groups(conn)))

    def serve_connection(self, conn: socket.socket) -> None:
        if not self.slots.acquire(blocking=False):
            _try_reply(conn, {"ok": False, "status": 1, "error": "too many connections to the gateway; retry"})
            return
        try:
            pid, uid, gid = peer_credentials(conn)
            if not self.allowed(conn, uid, gid):
                log.warning("refused uid %d (pid %d): not root and not in the operators' group", uid, pid)
                _try_reply(conn, {"ok": False, "status": 1,
                                  "error": "not allowed: run as root or as a member of the operators' group"})
                return
            conn.settimeout(IDLE_SECONDS)
            while True:
                try:
                    req = read_frame(conn)
                except FrameError as e:
                    _try_reply(conn, {"ok": False, "status": 2, "error": f"bad frame: {e}"})
                    return
                except (socket.timeout, OSError):
                    return
                if req is None:
                    return
                try:
                    write_frame(conn, self.answer(req, uid))
                except OSError:
                    return
        finally:
            self.slots.release()

    def answer(self, req: Any, uid: int) -> dict:
        try:
            handler, args, changes = check_request(req)
            fn: Callable = getattr(self.target, handler)
            result = fn(uid, **args) if changes else fn(**args)
            return {"ok": True, "result": result}
        except ZtError as e:
            return {"ok": False, "status": e.exit_status, "error": str(e)}
        except Exception as e:   # a bug must not take the daemon down: say so, log it
            log.exception("request %r failed", req.get("op") if isinstance(req, dict) else req)
            return {"ok": False, "status": 1, "error": f"internal error ({type(e).__name__}: {e}); see the gateway log"}

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _try_reply(conn: socket.socket, reply: dict) -> None:
    try:
        conn.settimeout(2)
        write_frame(conn, reply)
    except OSError:
        pass
