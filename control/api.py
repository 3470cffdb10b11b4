"""The gateway's local API: length-prefixed msgpack over a Unix socket.

A frame is a 4-byte big-endian length and that many bytes of msgpack. A request is
{"op": NAME, "args": {...}}; a reply is {"ok": true, "result": ...} or
{"ok": false, "error": MESSAGE, "status": EXIT_STATUS}. The server (control/server.py) answers
one request at a time per connection; this module holds the framing both sides share and the
client the CLI uses.
"""
from __future__ import annotations

import socket
import struct
from typing import Any, Optional

import msgpack

from .socket_default import socket_path
from .errors import InputError, ZtError

MAX_FRAME = 64 << 20       # a 100k-device identities file is about 15 MiB of YAML
HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The peer sent something that is not a frame: the connection cannot go on."""


def recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    """n bytes, or None if the peer closed before sending any; FrameError if it closed midway."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise FrameError(f"connection closed inside a frame ({got} of {n} bytes)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> Optional[Any]:
    header = recv_exact(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes is larger than the limit of {MAX_FRAME}")
    body = recv_exact(sock, length) if length else b""
    if body is None:
        raise FrameError("connection closed after a frame header")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"frame is not valid msgpack: {type(e).__name__}") from None


def write_frame(sock: socket.socket, obj: Any) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(HEADER.pack(len(body)) + body)


class GatewayError(ZtError):
    """The gateway refused or failed a request; carries the exit status it chose."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.exit_status = status


class Client:
    """One connection to the running gateway."""

    def __init__(self, path: Optional[str] = None, timeout: float = 300.0):
        self.path = path or socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except FileNotFoundError:
            self.sock.close()
            raise ZtError(f"no gateway is listening at {self.path}: start it with "
                          "`ztgate gateway run --config FILE` (or set ZTGATE_SOCKET)") from None
        except PermissionError:
            self.sock.close()
            raise ZtError(f"not allowed to use {self.path}: run as root or as a member of the "
                          "gateway's operators group (socket_group, default ztgate)") from None
        except OSError as e:
            self.sock.close()
            raise ZtError(f"cannot reach the gateway at {self.path}: {e.strerror}") from None

    def call(self, op: str, **args) -> Any:
        try:
            write_frame(self.sock, {"op": op, "args": args})
            reply = read_frame(self.sock)
        except (OSError, FrameError) as e:
            raise ZtError(f"lost the gateway at {self.path} during {op}: {e}") from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ZtError(f"the gateway sent a reply this ztgate does not understand: {reply!r:.200}")
        if not reply["ok"]:
            status = reply.get("status", 1)
            if status == 2:
                raise InputError(reply.get("error", "bad request"))
            raise GatewayError(reply.get("error", "request failed"), status)
        return reply.get("result")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
