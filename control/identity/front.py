"""The enrollment service's door: what happens to a connection before uvicorn sees a request.

uvicorn starts no timer before a connection's first request (its keep-alive timeout runs only
after a response), asyncio gives a TLS handshake 60 s, and the per-client limiter (http.py)
sees whole requests only. So one host that opens connections and sends nothing (or a header
a byte a second) would hold uvicorn's connection slots (limit_concurrency) and make every
renewal and SCIM call answer 503. Here, in front of uvicorn's own protocol:

- one accept loop takes each connection with its peer address, and refuses (closes) it when
  that address (an IPv6 /64, see http.client_key) holds PER_ADDRESS connections already. Only
  connections not answered yet are counted (in their handshake, or before their first whole
  request is answered): a connection that was answered is bounded by the keep-alive time and
  the rate limiter, so the cap cannot be dodged and does not punish keep-alive;
- TLS is done by asyncio (connect_accepted_socket) within HANDSHAKE_SECONDS, and its closing
  handshake (close_notify) waits SSL_SHUTDOWN_SECONDS, not asyncio's 30 s;
- a connection must deliver a whole request within REQUEST_SECONDS of its handshake (plus
  its Content-Length at BODY_RATE), and the next one within the keep-alive time plus
  REQUEST_SECONDS of a response, or it is answered 408 and cut (aborted: a client that does
  not read keeps nothing). A request that is whole is never cut: the deadline is for what
  the client sends.

uvicorn's own limit_concurrency is off (service.py): the per-address cap and LimitNOFILE bound
the connections, and a global count would let a few addresses fill it for everyone.

The rest is uvicorn's (uvicorn.Server with its startup's create_server replaced by this).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
import time
from typing import Optional

import uvicorn

from .http import MAX_BODY, client_key

log = logging.getLogger("ztgate.enroll")

HANDSHAKE_SECONDS = 10      # a TLS handshake, from the connection's accept
REQUEST_SECONDS = 10        # a whole request (head and body), from the handshake or the last answer
PER_ADDRESS = 32            # connections not answered yet, at once, from one address (IPv6: one /64)
SSL_SHUTDOWN_SECONDS = 2    # TLS close_notify exchange at close; then the connection is aborted
BODY_RATE = 16 << 10        # bytes a second a body may come at: the deadline grows by Content-Length / this
WARN_EVERY = 60             # seconds between two warnings of refused connections
ACCEPT_RETRY = 0.1          # seconds to wait when accept fails (out of file descriptors)


class Slots:
    """Connections held per client key; thread-safe (read by tests and logs from other threads)."""

    def __init__(self, per_address: int = PER_ADDRESS):
        self.per_address = per_address
        self.lock = threading.Lock()
        self.held: dict[str, int] = {}

    def take(self, address: str) -> Optional["Slot"]:
        key = client_key(address)
        with self.lock:
            if self.held.get(key, 0) >= self.per_address:
                return None
            self.held[key] = self.held.get(key, 0) + 1
        return Slot(self, key)

    def _give_back(self, key: str) -> None:
        with self.lock:
            left = self.held.get(key, 0) - 1
            if left > 0:
                self.held[key] = left
            else:
                self.held.pop(key, None)


class Slot:
    """One connection's place; released once, whichever of its ends comes first."""

    def __init__(self, slots: Slots, key: str):
        self.slots, self.key, self.released = slots, key, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slots._give_back(self.key)


@functools.lru_cache(maxsize=None)
def deadline_protocol(base: type) -> type:
    """uvicorn's HTTP protocol BASE with the request deadline and a Slot released at the end."""

    class WithDeadline(base):
        def __init__(self, *args, slot: Slot, **kw):
            super().__init__(*args, **kw)
            self.slot = slot
            self.deadline: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm(REQUEST_SECONDS)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.slot.release()         # answered: no longer counted against its address
            if self.transport.is_closing():     # the answer has this long to be read, then the end
                self._arm(REQUEST_SECONDS)
            else:
                self._arm(self.timeout_keep_alive + REQUEST_SECONDS)

        def connection_lost(self, exc) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            try:
                super().connection_lost(exc)
            finally:
                self.slot.release()

        def _arm(self, seconds: float) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(seconds, self._late)
            self.deadline_seconds, self.stretched = seconds, False

        def _late(self) -> None:
            if self.transport.is_closing():     # closing already (uvicorn's keep-alive timeout, or
                self.transport.abort()          # ours): a client that does not read keeps nothing
                return
            cycle = self.cycle
            if cycle is not None and not cycle.more_body and not cycle.response_complete:
                return          # the request is whole: the app is answering it
            if self._stretch(cycle):
                return
            if cycle is None or cycle.response_complete or not cycle.response_started:
                self.transport.write(timeout_response(self.deadline_seconds))
            # close sends the 408 and close_notify; abort frees the slot even if the client never reads
            self.transport.close()
            self.deadline = self.loop.call_later(SSL_SHUTDOWN_SECONDS, self.transport.abort)

        def _stretch(self, cycle) -> bool:
            """A body still coming, announced by Content-Length, gets length / BODY_RATE more
            seconds, once (so the 256 KiB limit is reachable on a slow link)."""
            if cycle is None or cycle.response_complete or self.stretched:
                return False
            self.stretched = True
            length = dict(cycle.scope["headers"]).get(b"content-length", b"")
            extra = min(int(length), MAX_BODY) / BODY_RATE if length.isdigit() else 0   # (more is refused: 413)
            if extra < 1:
                return False
            self.deadline = self.loop.call_later(extra, self._late)
            self.deadline_seconds += extra
            return True

    WithDeadline.__name__ = f"WithDeadline{base.__name__}"
    return WithDeadline


def timeout_response(seconds: float) -> bytes:
    body = f'{{"error": "the request did not arrive whole within {seconds:.0f} s"}}'.encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


class Door:
    """The listening socket and its accept loop; stands in for the asyncio Server uvicorn keeps
    (close, wait_closed)."""

    def __init__(self, sock: socket.socket, server: "GatedServer"):
        self.sock, self.server = sock, server
        self.handshakes: set[asyncio.Task] = set()
        self.task = asyncio.get_running_loop().create_task(self._accept())
        self.refused = 0            # connections closed at accept: their address held PER_ADDRESS

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        warned = refusals_warned = -float("inf")
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as e:          # EMFILE, ENFILE, ECONNABORTED...: the loop must go on
                if time.monotonic() - warned > 60:
                    log.warning("enrollment service: accept failed: %s", e)
                    warned = time.monotonic()
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            slot = self.server.slots.take(peer[0])
            if slot is None:
                self.refused += 1
                conn.close()
                if time.monotonic() - refusals_warned > WARN_EVERY:
                    log.warning("enrollment service: refused connections from %s: it holds %d not answered "
                                "yet (the cap per address; %d refused since start)",
                                client_key(peer[0]), self.server.slots.per_address, self.refused)
                    refusals_warned = time.monotonic()
                continue
            task = loop.create_task(self._open(conn, slot))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)

    async def _open(self, conn: socket.socket, slot: Slot) -> None:
        """The TLS handshake, then uvicorn's protocol (with the deadline) owns the connection."""
        server = self.server
        protocol = functools.partial(deadline_protocol(server.config.http_protocol_class), config=server.config,
                                     server_state=server.server_state, app_state=server.lifespan.state, slot=slot)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                protocol, conn, ssl=server.config.ssl, ssl_handshake_timeout=HANDSHAKE_SECONDS,
                ssl_shutdown_timeout=SSL_SHUTDOWN_SECONDS)
        except asyncio.CancelledError:  # shutdown
            slot.release()
            conn.close()
            raise
        except Exception as e:          # a failed or late handshake: the place is free
            log.debug("enrollment service: no TLS session: %s", e)
            slot.release()
            conn.close()

    def close(self) -> None:
        self.task.cancel()
        for t in list(self.handshakes):
            t.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self.task, *self.handshakes, return_exceptions=True)


class GatedServer(uvicorn.Server):
    """uvicorn's server, listening through a Door."""

    def __init__(self, config: uvicorn.Config, slots: Optional[Slots] = None):
        super().__init__(config)
        self.slots = slots or Slots()

    async def startup(self, sockets=None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise SystemExit(3)
        host, port = self.config.host, self.config.port
        socks: list[socket.socket] = []
        try:
            for family, address in listen_addresses(host, port):
                socks.append(socket.create_server(address, family=family, backlog=self.config.backlog))
        except OSError as e:
            for sock in socks:
                sock.close()
            log.error("enrollment service: cannot listen on %s:%s: %s", host, port, e)
            await self.lifespan.shutdown()
            raise SystemExit(3) from None
        for sock in socks:
            sock.setblocking(False)
        self.servers = [Door(sock, self) for sock in socks]
        self.started = True


def listen_addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, address) of each address HOST names (a host name such as localhost may name an
    IPv4 and an IPv6 one: one listener each), in getaddrinfo's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((family, address[:2]) for family, _, _, _, address in infos))
