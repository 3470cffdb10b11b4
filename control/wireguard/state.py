"""What the API takes and gives: a peer as configured, and an interface's and its peers' state as read."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Interface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]


@dataclass(frozen=True)
class Peer:
    """A peer as configured here: a key and the addresses it may send from (and that are sent
    to it); where to dial it and how often to keep the tunnel up, for peers we dial out to."""
    public_key: str
    allowed_ips: tuple = ()    # addresses or networks; a bare address means /32 or /128
    endpoint: Optional[str] = None   # "IP:port" ("[IPv6]:port"); None: learnt from its packets
    keepalive: int = 0               # seconds between keepalives; 0: off


@dataclass
class PeerState:
    public_key: str
    endpoint: Optional[str]    # "198.18.0.2:51820" or "[fd00::2]:51820"; None before any packet
    allowed_ips: list[Network]
    last_handshake: int        # unix seconds, 0 if never
    rx_bytes: int
    tx_bytes: int


@dataclass
class InterfaceState:
    public_key: str            # "" while the interface has no private key
    listen_port: int
    peers: list[PeerState] = field(default_factory=list)

    def peer(self, public_key: str) -> Optional[PeerState]:
        return next((p for p in self.peers if p.public_key == public_key), None)
