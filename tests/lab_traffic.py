"""Traffic in the lab: sockets made inside a device's (or any) namespace by this process (setns
for this thread, then back, as tests/netns.py does: a socket stays in the namespace it was made
in, and nothing is started per probe), the probes the lab's services answer (echo, web page,
UDP echo, ICMP echo), and a sniffer of what arrives on an interface. Shared by
tests/net/test_lab.py and test_soak.py."""
from __future__ import annotations

import os
import secrets
import socket
import time
from contextlib import contextmanager

from pyroute2 import netns

APP, RDP = "10.20.0.10", "10.20.0.11"     # the lab's services on zt-app (spec/LAB.md)
BLOCKED_WAIT = 1.5        # how long a probe waits for an answer before calling it blocked


@contextmanager
def inside(ns: str):
    """This thread in namespace NS for the body (sockets made here stay there). The namespace
    is opened here, not by name in pyroute2: setns() by name creates a missing one."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    netns.pushns()
    try:
        netns.setns(fd)
        yield
    finally:
        netns.popns()
        os.close(fd)


def ns_socket(ns: str, kind=socket.SOCK_STREAM, proto: int = 0, family=socket.AF_INET,
              timeout: float = BLOCKED_WAIT) -> socket.socket:
    with inside(ns):
        s = socket.socket(family, kind, proto)
    s.settimeout(timeout)
    return s


def bound(ns: str, kind=socket.SOCK_STREAM, timeout: float = BLOCKED_WAIT) -> tuple[socket.socket, int]:
    """A socket in NS with its source port chosen now (the reference is asked about that exact port)."""
    s = ns_socket(ns, kind, timeout=timeout)
    s.bind(("0.0.0.0", 0))
    return s, s.getsockname()[1]


def recv_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(200)
        if not chunk:
            break
        data += chunk
    return data


def echo(s: socket.socket, timeout: float = BLOCKED_WAIT) -> bool:
    """A round trip on an open echo connection: True when the token comes back."""
    token = secrets.token_hex(8).encode() + b"\n"
    s.settimeout(timeout)
    try:
        s.sendall(token)
        got = b""
        while len(got) < len(token):
            chunk = s.recv(100)
            if not chunk:
                return False
            got += chunk
        return got == token
    except socket.timeout:
        return False


def open_echo(ns: str, dst: str, port: int, me: str, timeout: float = BLOCKED_WAIT,
              s: socket.socket | None = None) -> socket.socket | None:
    """A connection to an echo service whose greeting names ME (no NAT anywhere), or None when
    the connection gets no answer at all."""
    s = s or ns_socket(ns, timeout=timeout)
    try:
        s.connect((dst, port))
    except socket.timeout:
        s.close()
        return None
    s.settimeout(BLOCKED_WAIT)              # (a short connect wait need not rush the greeting)
    greeting = recv_line(s).decode()
    assert greeting.endswith(f", you are {me}\n"), f"{dst}:{port} greets {greeting!r}, expected it to name {me}"
    return s


def http_page(ns: str, dst: str, port: int, s: socket.socket | None = None) -> str | None:
    """The page of the lab's web service, or None when the connection gets no answer."""
    s = s or ns_socket(ns)
    try:
        s.connect((dst, port))
        return http_request(s)
    except socket.timeout:
        return None
    finally:
        s.close()


def http_request(s: socket.socket) -> str | None:
    """One request on an open connection: the body, or None when no answer comes back."""
    try:
        s.sendall(f"GET / HTTP/1.0\r\nHost: {APP}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    except socket.timeout:
        return None
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200"), head
    return body


def udp_echo(ns: str, dst: str, port: int, s: socket.socket | None = None) -> bool:
    s = s or ns_socket(ns, socket.SOCK_DGRAM)
    token = secrets.token_hex(8).encode()
    try:
        s.sendto(token, (dst, port))
        while True:                       # (an old answer may still be queued: skip it)
            data, peer = s.recvfrom(200)
            if data == token and peer == (dst, port):
                return True
    except socket.timeout:
        return False
    finally:
        s.close()


def icmp_echo(ns: str, dst: str) -> bool:
    """An ICMP echo request from NS (a raw socket: no ping here): whether its reply came back."""
    from scapy.layers.inet import ICMP as IcmpLayer

    ident = secrets.randbelow(0xFFFF) + 1
    s = ns_socket(ns, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        s.sendto(bytes(IcmpLayer(type=8, id=ident, seq=1) / b"ztgate-lab"), (dst, 0))
        deadline = time.monotonic() + BLOCKED_WAIT
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, (peer, _) = s.recvfrom(2000)
            except socket.timeout:
                break
            icmp = data[(data[0] & 0xF) * 4:]          # a raw socket hands over the IP header too
            if peer == dst and icmp[0] == 0 and int.from_bytes(icmp[4:6], "big") == ident:
                return True
        return False
    finally:
        s.close()


class Sniffer:
    """Every IPv4 packet on an interface of a namespace (an AF_PACKET socket), from now on."""

    def __init__(self, ns: str, ifname: str = "eth0"):
        self.sock = ns_socket(ns, socket.SOCK_RAW, socket.htons(0x0003), family=socket.AF_PACKET, timeout=0.1)
        self.sock.bind((ifname, 0))

    def packets(self, wait: float = 1.0) -> list[tuple[str, str, int, bytes]]:
        """(src, dst, proto, frame) of what arrived until WAIT seconds from now."""
        out, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                frame = self.sock.recv(65535)
            except socket.timeout:
                continue
            if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
                out.append((socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), frame[23], frame))
        return out

    def close(self):
        self.sock.close()
