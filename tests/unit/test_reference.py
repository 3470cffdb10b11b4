"""The reference evaluator against hand-worked cases from POLICY.md "Meaning"."""
import ipaddress

import pytest

from control.files import parse_identities, parse_policy
from control.model import Packet
from control.reference import decide

IDENTITIES = parse_identities({
    "users": [{"email": "alice@example.com", "groups": ["developers", "staff"]},
              {"email": "bob@example.com", "groups": ["staff"]},
              {"email": "carol@example.com"}],
    "devices": [{"name": "alice-laptop", "user": "alice@example.com", "tunnel_ipv4": "100.96.0.2", "tunnel_ipv6": "fd00:5a::2"},
                {"name": "bob-laptop", "user": "bob@example.com", "tunnel_ipv4": "100.96.0.3", "tunnel_ipv6": "fd00:5a::3"},
                {"name": "bob-phone", "user": "bob@example.com", "tunnel_ipv4": "100.96.0.4"},
                {"name": "carol-laptop", "user": "carol@example.com", "tunnel_ipv4": "100.96.0.5", "enabled": False}],
})
ALICE, BOB, BOB_PHONE, CAROL = "100.96.0.2", "100.96.0.3", "100.96.0.4", "100.96.0.5"
ALICE6 = "fd00:5a::2"


def pkt(src, dst="10.20.0.10", proto=6, sport=None, dport=None) -> Packet:
    if proto in (6, 17):
        sport, dport = (40000 if sport is None else sport), (22 if dport is None else dport)
    return Packet(ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, sport, dport)


def verdict(rules, packet, default="block", groups=None):
    """(verdict, rule) for the packet under a policy of these rules (name/precedence filled in)."""
    rules = [{"name": f"r{i}", "precedence": 10 * (i + 1), "action": "allow", **r} for i, r in enumerate(rules)]
    d = decide(parse_policy({"default_action": default, "groups": groups or {}, "rules": rules}), IDENTITIES, packet)
    return d.verdict, d.rule


ALLOW_ALL = {"name": "all"}


@pytest.mark.parametrize("src", ["100.96.0.99", "fd00:5a::99", CAROL])
def test_unknown_and_disabled_sources_are_unknown(src):
    dst = "fd20::1" if ":" in src else "10.20.0.10"
    assert verdict([ALLOW_ALL], pkt(src, dst), default="allow") == ("unknown", None)
    assert decide(parse_policy({}), IDENTITIES, pkt(src, dst)).reason == "unknown-source"


def test_ipv6_tunnel_address_identifies_the_device():
    assert verdict([{"name": "a", "principals": ["device:alice-laptop"]}], pkt(ALICE6, "fd20::1")) == ("allow", "a")


def test_disabled_rule_is_skipped():
    rules = [{"name": "off", "action": "block", "enabled": False}, {"name": "on"}]
    assert verdict(rules, pkt(ALICE)) == ("allow", "on")


def test_lower_precedence_first_regardless_of_file_order():
    rules = [{"name": "late", "precedence": 20, "action": "block"}, {"name": "early", "precedence": 10}]
    assert verdict(rules, pkt(ALICE)) == ("allow", "early")
    rules = [{"name": "late", "precedence": 20}, {"name": "early", "precedence": 10, "action": "block"}]
    assert verdict(rules, pkt(ALICE)) == ("block", "early")


@pytest.mark.parametrize("principals, src, matches", [
    (["user:bob@example.com"], BOB, True),
    (["user:bob@example.com"], BOB_PHONE, True),
    (["user:bob@example.com"], ALICE, False),
    (["user:BOB@Example.com"], BOB, True),
    (["group:developers"], ALICE, True),
    (["group:developers"], BOB, False),
    (["device:bob-phone"], BOB_PHONE, True),
    (["device:bob-phone"], BOB, False),
    (["group:developers", "device:bob-phone"], BOB_PHONE, True),
    (["group:developers", "device:bob-phone"], BOB, False),
    (["group:oncall"], BOB, True),        # local group from the policy
    (["group:oncall"], ALICE, False),
    (["group:alice@example.com"], ALICE, False),
    ([], BOB, True),                      # an empty list: every identity
    ([], ALICE, True),
])
def test_principals(principals, src, matches):
    rules = [{"name": "p", "principals": principals}]
    expected = ("allow", "p") if matches else ("block", None)
    assert verdict(rules, pkt(src), groups={"oncall": ["Bob@example.com"]}) == expected


def test_absent_principals_match_every_identity():
    for src in (ALICE, BOB, BOB_PHONE):
        assert verdict([{"name": "p"}], pkt(src)) == ("allow", "p")


@pytest.mark.parametrize("protocols, packet, matches", [
    (["udp"], pkt(ALICE, proto=17), True),
    (["udp"], pkt(ALICE, proto=6), False),
    (["tcp", "udp"], pkt(ALICE, proto=1), False),
    (["icmp"], pkt(ALICE, proto=1), True),                 # ICMP on IPv4
    (["icmp"], pkt(ALICE6, "fd20::1", proto=58), True),     # ICMPv6 on IPv6
    (["icmp"], pkt(ALICE, proto=58), False),               # 58 on IPv4 is 'other'
    (["icmp"], pkt(ALICE6, "fd20::1", proto=1), False),     # 1 on IPv6 is 'other'
    (["tcp", "udp", "icmp"], pkt(ALICE, proto=47), False),
    ([], pkt(ALICE, proto=6), False),                      # an empty list lists nothing
])
def test_protocols(protocols, packet, matches):
    expected = ("allow", "p") if matches else ("block", None)
    assert verdict([{"name": "p", "protocols": protocols}], packet) == expected


@pytest.mark.parametrize("proto, name", [(6, "tcp"), (17, "udp"), (1, "icmp"), (58, "other"), (47, "other")])
def test_protocol_name_ipv4(proto, name):
    assert pkt(ALICE, proto=proto).protocol_name == name


@pytest.mark.parametrize("proto, name", [(6, "tcp"), (17, "udp"), (58, "icmp"), (1, "other"), (59, "other")])
def test_protocol_name_ipv6(proto, name):
    assert pkt(ALICE6, "fd20::1", proto=proto).protocol_name == name


@pytest.mark.parametrize("section", ["source", "destination"])
@pytest.mark.parametrize("packet, matches", [
    (pkt(ALICE, proto=6), True),
    (pkt(ALICE, proto=17), True),
    (pkt(ALICE, proto=1), False),                     # ICMP never matches a rule that states ports
    (pkt(ALICE6, "fd20::1", proto=58), False),
    (pkt(ALICE, proto=47), False),
    (pkt(ALICE6, "fd20::1", proto=59), False),
])
def test_rule_stating_ports_matches_only_tcp_and_udp(section, packet, matches):
    rules = [{"name": "p", section: {"ports": ["0-65535"]}}]
    assert verdict(rules, packet) == (("allow", "p") if matches else ("block", None))


@pytest.mark.parametrize("rule, packet, matches", [
    ({"destination": {"ports": [22, "8000-8080"]}}, pkt(ALICE, dport=22), True),
    ({"destination": {"ports": [22, "8000-8080"]}}, pkt(ALICE, dport=8080), True),
    ({"destination": {"ports": [22, "8000-8080"]}}, pkt(ALICE, dport=8081), False),
    ({"source": {"ports": ["1024-65535"]}}, pkt(ALICE, sport=1023), False),
    ({"source": {"ports": ["1024-65535"]}}, pkt(ALICE, proto=17, sport=1024), True),
    ({"source": {"cidrs": ["100.96.0.2/32"]}}, pkt(ALICE), True),
    ({"source": {"cidrs": ["100.96.0.2/32"]}}, pkt(BOB), False),
    ({"destination": {"cidrs": ["10.20.0.0/16"]}}, pkt(ALICE, "10.20.5.5"), True),
    ({"destination": {"cidrs": ["10.20.0.0/16"]}}, pkt(ALICE, "10.21.0.1"), False),
    ({"destination": {"cidrs": ["10.20.0.0/16"], "except": ["10.20.99.0/24"]}}, pkt(ALICE, "10.20.98.1"), True),
    ({"destination": {"cidrs": ["10.20.0.0/16"], "except": ["10.20.99.0/24"]}}, pkt(ALICE, "10.20.99.1"), False),
    ({"destination": {"except": ["10.20.99.0/24"]}}, pkt(ALICE, "10.20.99.1"), False),
    ({"destination": {"except": ["10.20.99.0/24"]}}, pkt(ALICE, "8.8.8.8"), True),
    # an IPv4 packet never lies in an IPv6 prefix, and the other way round
    ({"destination": {"cidrs": ["::/0"]}}, pkt(ALICE, "10.20.0.10"), False),
    ({"destination": {"cidrs": ["::ffff:0:0/96"]}}, pkt(ALICE, "10.20.0.10"), False),
    ({"destination": {"cidrs": ["0.0.0.0/0"]}}, pkt(ALICE6, "fd20::1"), False),
    ({"destination": {"cidrs": ["0.0.0.0/0", "fd20::/64"]}}, pkt(ALICE6, "fd20::1"), True),
    ({"source": {"cidrs": ["::/0"]}}, pkt(ALICE), False),
    ({"source": {"cidrs": ["0.0.0.0/0"]}}, pkt(ALICE6, "fd20::1"), False),
    ({"destination": {"except": ["::/0"]}}, pkt(ALICE, "10.20.0.10"), True),
    ({"destination": {"except": ["0.0.0.0/0"]}}, pkt(ALICE6, "fd20::1"), True),
    ({"destination": {"cidrs": []}}, pkt(ALICE), False),
])
def test_addresses_and_ports(rule, packet, matches):
    assert verdict([{"name": "p", **rule}], packet) == (("allow", "p") if matches else ("block", None))


@pytest.mark.parametrize("default", ["allow", "block"])
def test_default_action_when_no_rule_matches(default):
    rules = [{"name": "other", "action": "block", "principals": ["user:carol@example.com"]}]
    assert verdict(rules, pkt(ALICE), default=default) == (default, None)
    assert decide(parse_policy({"default_action": default}), IDENTITIES, pkt(ALICE)).reason == "default"


def test_first_match_wins_and_reports_rule():
    rules = [{"name": "ssh-block", "action": "block", "destination": {"ports": [22]}}, {"name": "rest"}]
    assert verdict(rules, pkt(ALICE, dport=22), default="allow") == ("block", "ssh-block")
    assert verdict(rules, pkt(ALICE, dport=23), default="block") == ("allow", "rest")
    policy = parse_policy({"rules": [{"name": "x", "precedence": 1, "action": "allow"}]})
    assert decide(policy, IDENTITIES, pkt(ALICE)).reason == "rule"


@pytest.mark.parametrize("src", [ALICE, "100.96.0.99"])
def test_unreadable_bytes_win_over_source(src):
    """Malformed and fragment whatever the source: no lookup, no rule."""
    from scapy.layers.inet import ICMP, IP
    from scapy.packet import Raw

    allow_all = parse_policy({"default_action": "allow", "rules": [{"name": "all", "precedence": 1, "action": "allow"}]})
    short_tcp = bytes(IP(src=src, dst="10.20.0.10", proto=6) / Raw(bytes(8)))
    d = decide(allow_all, IDENTITIES, short_tcp)
    assert (d.verdict, d.rule, d.reason) == ("malformed", None, "tcp-short")
    d = decide(allow_all, IDENTITIES, bytes(IP(src=src, dst="10.20.0.10", frag=1) / ICMP()))
    assert (d.verdict, d.rule, d.reason) == ("fragment", None, "ipv4-fragment")
    d = decide(allow_all, IDENTITIES, bytes(IP(src=src, dst="10.20.0.10", flags="MF") / ICMP()))
    assert d.verdict == ("allow" if src == ALICE else "unknown")
