"""The lab's private services (spec/LAB.md), run in the zt-app namespace: each answers with
something a test can check, and names the address it was reached from (no NAT: the
connector forwards, so the app sees the device's tunnel address).

    10.20.0.10 tcp 8080   HTTP: "ztgate lab app 10.20.0.10:8080, you are ADDR"
    10.20.0.10 tcp 22     echo, after a one-line greeting "ssh-echo 10.20.0.10, you are ADDR"
    10.20.0.10 udp 5353   echo
    10.20.0.11 tcp 3389   echo, after a greeting "rdp-echo 10.20.0.11, you are ADDR"
    10.20.0.12 tcp 8080   HTTP: "ztgate lab wiki 10.20.0.12:8080, you are ADDR" (reached by name:
                          wiki.lab.example, from the lab's resolver; see lab/resolver.py)
"""
from __future__ import annotations

import signal
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

APP, RDP, WIKI = "10.20.0.10", "10.20.0.11", "10.20.0.12"


class Web(BaseHTTPRequestHandler):
    def do_GET(self):
        here = self.server.server_address[0]
        body = f"ztgate lab {'wiki' if here == WIKI else 'app'} {here}:8080, you are {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"http {self.client_address[0]} {fmt % args}", flush=True)


def echo_server(name: str, address: str):
    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(f"{name} {address}, you are {self.client_address[0]}\n".encode())
            while True:
                data = self.request.recv(65536)
                if not data:
                    return
                self.request.sendall(data)
    return Echo


class UdpEcho(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data, self.client_address)


class TCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class UDP(socketserver.ThreadingUDPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> int:
    servers = [
        ThreadingHTTPServer((APP, 8080), Web),
        TCP((APP, 22), echo_server("ssh-echo", APP)),
        UDP((APP, 5353), UdpEcho),
        TCP((RDP, 3389), echo_server("rdp-echo", RDP)),
        ThreadingHTTPServer((WIKI, 8080), Web),
    ]
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("services up: http 10.20.0.10:8080, tcp echo 10.20.0.10:22, udp echo 10.20.0.10:5353, "
          "tcp echo 10.20.0.11:3389, http 10.20.0.12:8080", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
