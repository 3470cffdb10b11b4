"""The small world of the connector-side, fragment and conntrack kernel tests: two users and
their devices, an app behind the connector, the policy between them, and the reply to a
forward packet."""
import ipaddress

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from control.model import Device, Identities, Policy, Principal, Rule, User

IDS = Identities(
    (User("ann@example.com", ("dev",)), User("bob@example.com", ())),
    (Device("ann-laptop", "ann@example.com", ipaddress.IPv4Address("100.96.0.2"), ipaddress.IPv6Address("fd00:5a::2")),
     Device("bob-phone", "bob@example.com", ipaddress.IPv4Address("100.96.0.3"))))
POLICY = Policy("block", (
    Rule("ssh-dev", 10, "allow", principals=(Principal("group", "dev"),), protocols=frozenset({"tcp"}),
         dst_ports=((22, 22),)),
    Rule("web", 20, "allow", protocols=frozenset({"tcp"}), dst_ports=((8080, 8080),)),
    Rule("dns", 30, "allow", protocols=frozenset({"udp"}), dst_ports=((5353, 5353),)),
    Rule("icmp", 40, "allow", protocols=frozenset({"icmp"})),
))
ANN4, ANN6, BOB4, APP4, APP6 = "100.96.0.2", "fd00:5a::2", "100.96.0.3", "10.20.0.10", "fd20::10"


def reverse(pkt):
    """The reply to a forward packet: addresses and ports swapped."""
    ip = pkt.copy()
    l3 = ip[IP] if IP in ip else ip[IPv6]
    l3.src, l3.dst = l3.dst, l3.src
    l4 = ip[TCP] if TCP in ip else ip[UDP]
    l4.sport, l4.dport = l4.dport, l4.sport
    if TCP in ip:
        l4.flags = "SA"
    return ip
