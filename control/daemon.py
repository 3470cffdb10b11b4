"""`ztgate gateway run`: the controller daemon. It makes the kernel and the WireGuard peers
equal to the store, then serves the CLI on the Unix socket, writes flow events to the flow
log and exposes Prometheus metrics, until SIGTERM or SIGINT.

Stopping the daemon (or killing it) leaves the program attached and its maps pinned: the
gateway keeps enforcing the last policy. `ztgate gateway teardown` removes it all.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from typing import Optional

from .config import Config
from .flowlog import FlowLog, read_events
from .gateway import Gateway
from .server import Server

log = logging.getLogger("ztgate.daemon")


class Daemon:
    """What the socket serves: the gateway's operations, plus the flow log."""

    def __init__(self, config: Config):
        # What the daemon writes (store, flow log and its rotations, pins) is for root and the
        # ztgate group only; the socket sets its own 0660.
        os.umask(0o027)
        self.config = config
        self.gateway = Gateway(config)
        self.flowlog = FlowLog(config, self.gateway)

    def __getattr__(self, name: str):
        return getattr(self.gateway, name)

    def logs(self, cursor: Optional[list], user: Optional[str], verdict: Optional[str], device: Optional[str],
             limit: int) -> dict:
        return read_events(self.config.flow_log, cursor, user, verdict, device, limit)

    def run(self) -> None:
        self.gateway.start()
        self.gateway.dns_start()                # the DNS slow path (control/dns), if resolvers are set
        self.flowlog.start()
        metrics = None
        if self.config.metrics_address:
            from .metrics import serve_metrics
            metrics = serve_metrics(self.config.metrics_address, self.gateway, self.flowlog)
        if self.config.identity is not None:   # issue 14: HTTPS enrollment and SCIM (control/identity/), a thread
            from .identity.service import EnrollmentService
            EnrollmentService(self.config, self.gateway).start()
        server = Server(self.config.socket, self.config.socket_group, self)
        stop = threading.Event()

        def on_signal(signum, frame):
            log.info("signal %d: stopping (the program stays attached and enforcing)", signum)
            stop.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("serving %s", self.config.socket)
        print(f"ztgate: gateway ready on {self.config.interface}, socket {self.config.socket}", flush=True)
        server.serve_forever()
        self.gateway.dns_stop()                 # its chain goes: answers pass unqueued (and unlearned)
        self.flowlog.stop()
        if metrics is not None:
            metrics[0].shutdown()


def teardown(config: Config) -> list[str]:
    """Remove what the gateway put on the host, keeping the store: the program from the
    interface, the interface, the pins and the socket. Says what it removed."""
    from . import routes, wireguard
    from .kernel import remove_pins
    from .store import connector_interfaces

    done = []
    # read, not opened as a Store: no upgrade and no second round of the store's warnings
    connectors = connector_interfaces(config.database) if config.database.exists() else []
    for ifname in connectors:
        if wireguard.exists(ifname):
            wireguard.delete_interface(ifname)     # (its XDP program goes with it)
            done.append(f"deleted connector interface {ifname}")
    # The interface goes before its routing rules, and with its program: no moment in which
    # a device's packet is forwarded undecided, or by the host's main table.
    if wireguard.exists(config.interface):
        wireguard.delete_interface(config.interface)
        done.append(f"deleted interface {config.interface} (and its XDP program)")
    if routes.remove_rules(config.route_table, config.route_priority, config.interface):
        done.append(f"removed routing table {config.route_table} and its rules")
    from .dns import netfilter                  # the DNS slow path's chain, if one is left
    if netfilter.remove(config.interface):
        done.append(f"removed the DNS slow path's chain {netfilter.chain_name(config.interface)}")
    if os.path.exists(config.bpf_pin_dir):
        remove_pins(config.bpf_pin_dir)
        shutil.rmtree(config.bpf_pin_dir, ignore_errors=True)
        done.append(f"removed pins under {config.bpf_pin_dir}")
    if os.path.exists(config.socket):
        os.unlink(config.socket)
        done.append(f"removed {config.socket}")
    return done
