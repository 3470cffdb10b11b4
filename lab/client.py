"""A small client for the lab's services, run inside a device namespace (the hosts have no nc):

    python -m lab.client tcp HOST PORT       connect to an echo service, print its greeting and an echo,
                                             or that it is blocked
    python -m lab.client udp HOST PORT       one datagram, print the echo, or that none came back
    python -m lab.client hold HOST PORT      one TCP connection kept open: an echo every --every
                                             seconds for --seconds, each answered or not, with the time

Exit status 0 when every exchange was answered, 1 otherwise.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time


def tcp(host: str, port: int, timeout: float) -> int:
    """For the echo services, which greet first."""
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        print(f"tcp {host}:{port} blocked: no connection within {timeout:g} s ({e.__class__.__name__})")
        return 1
    with s:
        try:
            s.settimeout(timeout)
            greeting = s.recv(4096).decode(errors="replace").strip()
            s.sendall(b"hello\n")
            echo = s.recv(4096).decode(errors="replace").strip()
        except OSError as e:
            print(f"tcp {host}:{port} connected, but no greeting and echo within {timeout:g} s "
                  f"({e.__class__.__name__})")
            return 1
        print(f"tcp {host}:{port} answers: {greeting!r}, echo {echo!r}")
        return 0


def udp(host: str, port: int, timeout: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"hello", (host, port))
        try:
            data, _ = s.recvfrom(4096)
            print(f"udp {host}:{port} echoes {data.decode(errors='replace')!r}")
            return 0
        except OSError:
            print(f"udp {host}:{port} blocked: no echo within {timeout:g} s")
            return 1


def hold(host: str, port: int, every: float, seconds: float) -> int:
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=3) as s:
        s.settimeout(every)
        print(f"[{0:5.1f}s] connected to {host}:{port}: {s.recv(4096).decode(errors='replace').strip()!r}", flush=True)
        n, missed = 0, 0
        while time.monotonic() - start < seconds:
            n += 1
            t = time.monotonic() - start
            try:
                s.sendall(f"echo {n}\n".encode())
                got = s.recv(4096).decode(errors="replace").strip()
                print(f"[{t:5.1f}s] echo {n}: answered ({got!r})", flush=True)
            except OSError:
                missed += 1
                print(f"[{t:5.1f}s] echo {n}: NO ANSWER", flush=True)
            time.sleep(max(0.0, every - (time.monotonic() - start - t)))
    return 1 if missed else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("tcp", "udp", "hold"))
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--seconds", type=float, default=6.0)
    a = ap.parse_args()
    if a.mode == "tcp":
        return tcp(a.host, a.port, a.timeout)
    if a.mode == "udp":
        return udp(a.host, a.port, a.timeout)
    return hold(a.host, a.port, a.every, a.seconds)


if __name__ == "__main__":
    sys.exit(main())
