"""Packets as the probes take them: JSON lines by fields or raw bytes; the reading of raw bytes
that spec/POLICY.md defines (the reference side of it); and building raw bytes from fields."""
from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from dataplane.reasons import Reason

from .errors import InputError
from .model import Packet
from .protocols import ICMP, ICMPV6, TCP, UDP, number_of

# IPv6 extension headers the spec walks, and how their length byte counts.
EXT_OCTETS = {0: 8, 43: 8, 60: 8}      # (len + 1) * 8
EXT_AUTH = 51                          # (len + 2) * 4
EXT_FRAGMENT = 44                      # 8 bytes
MAX_EXT_HEADERS = 8


class Unreadable(Exception):
    """Raw bytes the spec calls malformed or fragment."""

    def __init__(self, reason: Reason):
        super().__init__(reason.label)
        self.reason = reason

    @property
    def verdict(self) -> str:
        return "fragment" if self.reason in (Reason.IPV4_FRAGMENT, Reason.IPV6_FRAGMENT) else "malformed"


def parse_raw(data: bytes) -> Packet:
    """Read a packet from its bytes (IP header first) exactly as POLICY.md says, or raise Unreadable."""
    if not data or data[0] >> 4 not in (4, 6):
        raise Unreadable(Reason.BAD_VERSION)
    if data[0] >> 4 == 4:
        if len(data) < 20:
            raise Unreadable(Reason.IPV4_SHORT)
        ihl = (data[0] & 0x0F) * 4
        total = struct.unpack_from("!H", data, 2)[0]
        if ihl < 20:
            raise Unreadable(Reason.IPV4_BAD_IHL)
        if total < ihl:
            raise Unreadable(Reason.IPV4_BAD_LENGTH)
        if total > len(data):
            raise Unreadable(Reason.IPV4_TRUNCATED)
        if struct.unpack_from("!H", data, 6)[0] & 0x1FFF:
            raise Unreadable(Reason.IPV4_FRAGMENT)
        proto = data[9]
        src, dst = ipaddress.IPv4Address(data[12:16]), ipaddress.IPv4Address(data[16:20])
        l4, end = ihl, total
    else:
        if len(data) < 40:
            raise Unreadable(Reason.IPV6_SHORT)
        payload = struct.unpack_from("!H", data, 4)[0]
        if payload == 0:
            raise Unreadable(Reason.IPV6_BAD_LENGTH)
        if payload > len(data) - 40:
            raise Unreadable(Reason.IPV6_TRUNCATED)
        end = 40 + payload
        proto, l4 = data[6], 40
        src, dst = ipaddress.IPv6Address(data[8:24]), ipaddress.IPv6Address(data[24:40])
        for count in range(MAX_EXT_HEADERS + 1):
            if proto not in EXT_OCTETS and proto not in (EXT_AUTH, EXT_FRAGMENT):
                break
            if count == MAX_EXT_HEADERS:
                raise Unreadable(Reason.IPV6_EXT_TOO_MANY)
            if proto == EXT_FRAGMENT:
                size = 8
            elif end - l4 < 2:
                raise Unreadable(Reason.IPV6_EXT_TRUNCATED)
            elif proto == EXT_AUTH:
                size = (data[l4 + 1] + 2) * 4
            else:
                size = (data[l4 + 1] + 1) * 8
            if size > end - l4:
                raise Unreadable(Reason.IPV6_EXT_TRUNCATED)
            if proto == EXT_FRAGMENT and struct.unpack_from("!H", data, l4 + 2)[0] >> 3:
                raise Unreadable(Reason.IPV6_FRAGMENT)
            proto, l4 = data[l4], l4 + size
    present = end - l4
    if proto == TCP:
        if present < 20:
            raise Unreadable(Reason.TCP_SHORT)
        offset = (data[l4 + 12] >> 4) * 4
        if offset < 20:
            raise Unreadable(Reason.TCP_BAD_OFFSET)
        if offset > present:
            raise Unreadable(Reason.TCP_TRUNCATED)
    elif proto == UDP and present < 8:
        raise Unreadable(Reason.UDP_SHORT)
    if proto in (TCP, UDP):
        sport, dport = struct.unpack_from("!HH", data, l4)
        return Packet(src, dst, proto, sport, dport)
    return Packet(src, dst, proto)


@dataclass(frozen=True)
class FragmentPart:
    """A packet's place in a fragmented datagram, as POLICY.md's fragments read it."""

    datagram: tuple     # family, addresses, identification, and the protocol its header names
                        # (IPv4's protocol; IPv6's Fragment header's next header)
    offset: int         # bytes from the start of the fragmentable part
    more: bool          # more fragments follow
    headers_end: int    # a first fragment: where its headers end in the fragmentable part (IPv6:
                        # the extension headers after the Fragment header, then the transport header)


def _transport_len(data: bytes, l4: int, end: int, proto: int) -> int:
    """The transport header a first fragment holds (parse_raw read it whole)."""
    if proto == TCP:
        return (data[l4 + 12] >> 4) * 4
    if proto == UDP or (proto in (ICMP, ICMPV6) and end - l4 >= 8):
        return 8
    return 0


def fragment_of(data: bytes) -> Optional[FragmentPart]:
    """Where a packet lies in its fragmented datagram; None if it is no fragment, or a first
    fragment that cannot be read."""
    try:
        parse_raw(data)
        first = True
    except Unreadable as e:
        if e.reason not in (Reason.IPV4_FRAGMENT, Reason.IPV6_FRAGMENT):
            return None
        first = False
    if data[0] >> 4 == 4:
        flags = struct.unpack_from("!H", data, 6)[0]
        if not flags & 0x3FFF:
            return None
        ihl, total, proto = (data[0] & 0x0F) * 4, struct.unpack_from("!H", data, 2)[0], data[9]
        return FragmentPart((4, data[12:20], data[4:6], proto), (flags & 0x1FFF) * 8, bool(flags & 0x2000),
                            _transport_len(data, ihl, total, proto) if first else 0)
    end, proto, off, frag, start = 40 + struct.unpack_from("!H", data, 4)[0], data[6], 40, None, 0
    while proto in EXT_OCTETS or proto in (EXT_AUTH, EXT_FRAGMENT):    # (parse_raw walked it)
        size = 8 if proto == EXT_FRAGMENT else (data[off + 1] + 2) * 4 if proto == EXT_AUTH else (data[off + 1] + 1) * 8
        if proto == EXT_FRAGMENT:
            frag, start = (data[off], struct.unpack_from("!H", data, off + 2)[0], data[off + 4:off + 8]), off + 8
            if frag[1] >> 3:
                break           # a later fragment: what follows is its datagram's payload
        proto, off = data[off], off + size
    if frag is None:
        return None
    nh, word, ident = frag
    headers = off - start + _transport_len(data, off, end, proto) if first else 0
    return FragmentPart((6, data[8:40], ident, nh), (word >> 3) * 8, bool(word & 1), headers)


def build_raw(pkt: Packet) -> bytes:
    """The packet as it appears on the WireGuard interface: bytes from the IP header on."""
    from scapy.layers.inet import ICMP as ScICMP, IP, TCP as ScTCP, UDP as ScUDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.packet import Raw

    v6 = pkt.src.version == 6
    ip = IPv6(src=str(pkt.src), dst=str(pkt.dst)) if v6 else IP(src=str(pkt.src), dst=str(pkt.dst))
    if pkt.proto == TCP:
        l4 = ScTCP(sport=pkt.sport, dport=pkt.dport, flags="S")
    elif pkt.proto == UDP:
        l4 = ScUDP(sport=pkt.sport, dport=pkt.dport) / Raw(b"ztgate")
    elif pkt.proto == ICMP and not v6:
        l4 = ScICMP()
    elif pkt.proto == ICMPV6 and v6:
        l4 = ICMPv6EchoRequest()
    else:
        l4 = Raw(b"\x00" * 8)
        if v6:
            ip.nh = pkt.proto
        else:
            ip.proto = pkt.proto
    return bytes(ip / l4)


# ---------------------------------------------------------------------------------------------
# PKTS.jsonl

Probe = Union[Packet, bytes]   # by fields, or raw bytes


def packet_from_fields(obj: dict, where: str = "packet") -> Packet:
    unknown = set(obj) - {"src", "dst", "proto", "sport", "dport"}
    if unknown:
        raise InputError(f"{where}: unknown key {sorted(unknown)[0]!r} (use src, dst, proto, sport, dport, or raw)")
    try:
        src, dst = ipaddress.ip_address(obj["src"]), ipaddress.ip_address(obj["dst"])
    except KeyError as e:
        raise InputError(f"{where}: {e.args[0]!r} is required") from None
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    if src.version != dst.version:
        raise InputError(f"{where}: src and dst must both be IPv4 or both IPv6")
    proto = obj.get("proto")
    if isinstance(proto, str) and number_of(proto.lower(), src.version) is not None:
        proto = number_of(proto.lower(), src.version)
    elif isinstance(proto, str) and proto.isdigit():
        proto = int(proto)
    if not isinstance(proto, int) or isinstance(proto, bool) or not 0 <= proto <= 255:
        raise InputError(f"{where}: proto {obj.get('proto')!r} is not tcp, udp, icmp or a protocol number 0-255")
    if src.version == 6 and (proto in EXT_OCTETS or proto in (EXT_AUTH, EXT_FRAGMENT)):
        raise InputError(f"{where}: proto {proto} is an IPv6 extension header, not a protocol: "
                         "give this packet as raw bytes ({\"raw\": \"60...\"})")
    ports = {}
    for key in ("sport", "dport"):
        value = obj.get(key)
        if proto not in (TCP, UDP):
            if value is not None:
                raise InputError(f"{where}: {key} is only for tcp and udp")
            continue
        value = 0 if value is None else value   # an absent port is port 0
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise InputError(f"{where}: {key} {value!r} is not a port 0-65535")
        ports[key] = value
    return Packet(src, dst, proto, ports.get("sport"), ports.get("dport"))


def probe_from_json(obj, where: str = "packet") -> Probe:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: must be a JSON object")
    if "raw" in obj:
        if set(obj) != {"raw"}:
            raise InputError(f"{where}: a raw packet has only the key 'raw'")
        try:
            return bytes.fromhex(obj["raw"])
        except (TypeError, ValueError):
            raise InputError(f"{where}: raw must be the packet's bytes in hex") from None
    return packet_from_fields(obj, where)


def load_probes(path: str | Path) -> list[Probe]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    probes = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON: {e.msg}") from None
        probes.append(probe_from_json(obj, f"{path}:{n}"))
    return probes


def probe_bytes(probe: Probe) -> bytes:
    return probe if isinstance(probe, bytes) else build_raw(probe)
