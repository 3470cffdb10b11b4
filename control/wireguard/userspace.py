"""wireguard-go: starting it, and its userspace API, a unix socket /var/run/wireguard/NAME.sock
speaking https://www.wireguard.com/xplatform/ (keys in hex). That folder is shared by all
network namespaces, so interface names must be unique across namespaces."""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time
from typing import Optional

from ..errors import KernelError
from .keys import from_hex, public_key_of
from .state import InterfaceState, PeerState


SOCKET_DIR = "/var/run/wireguard"
WIREGUARD_GO = "wireguard-go"
UAPI_TIMEOUT = 5.0      # seconds for one request on the wireguard-go socket
START_TIMEOUT = 10.0    # seconds for wireguard-go to start and answer


def socket_path(name: str) -> str:
    return os.path.join(SOCKET_DIR, name + ".sock")


def answers(name: str) -> bool:
    """Does a wireguard-go serve NAME (from whichever namespace)?"""
    try:
        uapi(name, "get=1\n\n", timeout=1.0)
        return True
    except KernelError:
        return False


def start_wireguard_go(name: str) -> None:
    if answers(name):
        # The link is not in this namespace (we looked), but the socket of that name answers:
        # a wireguard-go in another namespace owns the name.
        raise KernelError(f"a wireguard-go already serves {name} from another network namespace; "
                          f"interface names must be unique across namespaces (all share {SOCKET_DIR})")
    unlink_socket(name)                    # a stale socket left by a killed wireguard-go
    # wireguard-go daemonizes: it creates the TUN link and the listening socket, starts a copy
    # of itself holding both, and exits. That copy must OUTLIVE us: the data plane keeps
    # enforcing while the controller is down or restarting, and a restarted controller adopts
    # the interface with its sessions. Without a session of its own it would stay in our
    # session and process group and die with them (a terminal's SIGHUP, a ^C to the group).
    # (Under systemd the unit must also not kill its whole cgroup: KillMode=process.)
    env = {k: v for k, v in os.environ.items()
           # LOG_LEVEL would make the daemon keep our stdout/stderr (pipes we wait on);
           # the WG_* variables are wireguard-go's own daemonizing protocol.
           if k not in ("LOG_LEVEL", "WG_PROCESS_FOREGROUND", "WG_TUN_FD", "WG_UAPI_FD")}
    try:
        r = subprocess.run([WIREGUARD_GO, name], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, env=env, start_new_session=True, timeout=START_TIMEOUT)
    except FileNotFoundError:
        raise KernelError(f"cannot create WireGuard interface {name}: the kernel has no WireGuard "
                          f"and {WIREGUARD_GO} is not installed") from None
    except subprocess.TimeoutExpired:
        raise KernelError(f"{WIREGUARD_GO} {name} did not start within {START_TIMEOUT:.0f} s") from None
    if r.returncode != 0:
        # Drop the banner (a box of line-drawing characters saying a kernel module is better).
        said = " ".join(line.strip() for line in (r.stdout + r.stderr).splitlines()
                        if line.strip() and not any(c in line for c in "│┌└"))
        raise KernelError(f"{WIREGUARD_GO} {name} failed (exit {r.returncode}): {said or 'no message'}")
    deadline = time.monotonic() + START_TIMEOUT
    while not answers(name):
        if time.monotonic() > deadline:
            raise KernelError(f"{WIREGUARD_GO} {name} started but {socket_path(name)} does not answer")
        time.sleep(0.02)


def unlink_socket(name: str) -> None:
    try:
        os.unlink(socket_path(name))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise KernelError(f"cannot remove stale {socket_path(name)}: {e.strerror}") from None


def uapi(name: str, request: str, timeout: float = UAPI_TIMEOUT) -> str:
    """One request on NAME.sock; returns the reply without its errno line; KernelError on
    errno != 0 or when nothing answers."""
    path = socket_path(name)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(request.encode("ascii"))
            reply = b""
            while not reply.endswith(b"\n\n"):   # a reply ends with "errno=N\n\n"
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        raise KernelError(f"wireguard-go of {name} does not answer on {path}: {e.strerror or e}") from None
    lines = reply.decode("ascii", "replace").strip("\n").split("\n")
    if not lines or not lines[-1].startswith("errno="):
        raise KernelError(f"wireguard-go of {name}: truncated reply on {path}")
    code = abs(int(lines[-1][len("errno="):] or 0))
    if code:
        raise KernelError(f"wireguard-go of {name} refused the request: {os.strerror(code)} (errno {code})")
    return "\n".join(lines[:-1])


def uapi_set(name: str, lines: list[str]) -> None:
    uapi(name, "set=1\n" + "".join(line + "\n" for line in lines) + "\n")


def parse_uapi(text: str) -> InterfaceState:
    state = InterfaceState(public_key="", listen_port=0)
    peer: Optional[PeerState] = None
    for line in text.split("\n"):
        key, _, value = line.partition("=")
        if key == "private_key":
            state.public_key = public_key_of(from_hex(value)) if value.strip("0") else ""
        elif key == "listen_port":
            state.listen_port = int(value)
        elif key == "public_key":          # starts the next peer
            peer = PeerState(from_hex(value), None, [], 0, 0, 0)
            state.peers.append(peer)
        elif peer is None:
            continue
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "allowed_ip":
            peer.allowed_ips.append(ipaddress.ip_network(value))
        elif key == "last_handshake_time_sec":
            peer.last_handshake = int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
    return state
