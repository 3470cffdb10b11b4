"""The connector side (xdp_ztgate_reply, BPF_PROG_TEST_RUN): from a private network towards
devices, only replies of TCP/UDP flows and ICMP echoes the ingress program allowed pass, by zt_ct.

Every forward packet is decided by the reference too: its reply must pass exactly when the
reference allowed it."""
import ipaddress
import time
from dataclasses import replace

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from control.compiler import compile_policy
from control.model import Policy
from control.packets import parse_raw
from control.reference import decide
from dataplane.reasons import Reason, Verdict

from tests.app_policy import ANN4, ANN6, APP4, APP6, BOB4, IDS, POLICY, reverse
from tests.programs import TEST_LAYOUT, XDP_DROP, XDP_PASS, pinned_program

UDP_TIMEOUT = 1      # seconds: short, so that a test can watch an entry expire


@pytest.fixture(scope="module")
def program():
    """Pinned, as on a gateway: zt_ct outlives each load() of new tables."""
    with pinned_program("reply", replace(TEST_LAYOUT, ct_udp_seconds=UDP_TIMEOUT)) as prog:
        yield prog


@pytest.fixture
def loaded(program):
    program.load(compile_policy(POLICY, IDS, program.layout))
    program.clear_flows()
    return program


def ingress(program, pkt):
    with program.on_one_cpu() as cpu:
        return program.run(bytes(pkt), cpu=cpu)


def reply(program, pkt):
    with program.on_one_cpu() as cpu:
        return program.run(bytes(pkt), cpu=cpu, reply=True)


FORWARD = [
    IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="S"),     # ssh-dev
    IP(src=BOB4, dst=APP4) / TCP(sport=40001, dport=22, flags="S"),     # bob: default block
    IP(src=BOB4, dst=APP4) / TCP(sport=40002, dport=8080, flags="S"),   # web
    IP(src=ANN4, dst=APP4) / TCP(sport=40003, dport=3389, flags="S"),   # default block
    IP(src=ANN4, dst=APP4) / UDP(sport=40004, dport=5353),              # dns
    IP(src=BOB4, dst=APP4) / UDP(sport=40005, dport=53),                # default block
    IPv6(src=ANN6, dst=APP6) / TCP(sport=40006, dport=22, flags="S"),   # ssh-dev, IPv6
    IPv6(src=ANN6, dst=APP6) / UDP(sport=40007, dport=5353),            # dns, IPv6
    IP(src="100.96.0.77", dst=APP4) / UDP(sport=40008, dport=5353),     # unknown source
]


@pytest.mark.parametrize("fwd", FORWARD, ids=lambda p: p.summary())
def test_a_reply_passes_exactly_when_the_reference_allowed_its_flow(loaded, fwd):
    back = reverse(fwd)
    before = reply(loaded, back)
    assert (before.retval, before.verdict, before.reason) == (XDP_DROP, Verdict.BLOCK, Reason.NOT_REPLY)

    want = decide(POLICY, IDS, parse_raw(bytes(fwd)))
    assert ingress(loaded, fwd).verdict.label == want.verdict
    got = reply(loaded, back)
    if want.verdict == "allow":
        assert (got.retval, got.verdict, got.reason) == (XDP_PASS, Verdict.ALLOW, Reason.REPLY)
    else:
        assert (got.retval, got.verdict, got.reason) == (XDP_DROP, Verdict.BLOCK, Reason.NOT_REPLY)


def test_only_the_exact_reverse_tuple_passes(loaded):
    fwd = IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="S")
    assert ingress(loaded, fwd).retval == XDP_PASS
    assert reply(loaded, reverse(fwd)).retval == XDP_PASS
    strangers = [
        IP(src=APP4, dst=ANN4) / TCP(sport=22, dport=40001, flags="A"),     # another client port
        IP(src=APP4, dst=ANN4) / TCP(sport=23, dport=40000, flags="A"),     # another service port
        IP(src="10.20.0.11", dst=ANN4) / TCP(sport=22, dport=40000),        # another server
        IP(src=APP4, dst=BOB4) / TCP(sport=22, dport=40000, flags="A"),     # another device
        IP(src=APP4, dst=ANN4) / UDP(sport=22, dport=40000),                # another protocol
        IP(src=APP4, dst=ANN4) / TCP(sport=40000, dport=22, flags="S"),     # the forward tuple itself
        IP(src=APP4, dst=ANN4) / ICMP(),                                    # an echo request, not a reply
        IP(src=APP4, dst=ANN4, frag=5, proto=6) / (b"\0" * 16),             # a non-first fragment of TCP
    ]
    for pkt in strangers:
        got = reply(loaded, pkt)
        assert got.retval == XDP_DROP, pkt.summary()
    assert reply(loaded, reverse(fwd)).retval == XDP_PASS


def test_an_allowed_echo_request_lets_its_echo_reply_back(loaded):
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest
    cases = [(IP(src=ANN4, dst=APP4) / ICMP(type=8, id=77, seq=1),
              IP(src=APP4, dst=ANN4) / ICMP(type=0, id=77, seq=1), IP(src=APP4, dst=ANN4) / ICMP(type=0, id=78)),
             (IPv6(src=ANN6, dst=APP6) / ICMPv6EchoRequest(id=77),
              IPv6(src=APP6, dst=ANN6) / ICMPv6EchoReply(id=77), IPv6(src=APP6, dst=ANN6) / ICMPv6EchoReply(id=78))]
    for request, answer, other_id in cases:
        assert reply(loaded, answer).reason == Reason.NOT_REPLY       # nobody asked yet
        want = decide(POLICY, IDS, parse_raw(bytes(request)))
        assert want.verdict == "allow" and ingress(loaded, request).verdict == Verdict.ALLOW
        assert (reply(loaded, answer).retval, reply(loaded, answer).reason) == (XDP_PASS, Reason.REPLY)
        assert reply(loaded, other_id).reason == Reason.NOT_REPLY
        # an error or another type from the same host is no echo reply
        assert reply(loaded, IP(src=APP4, dst=ANN4) / ICMP(type=3, code=1)).retval == XDP_DROP
    # an echo request that was not allowed (an unknown source) lets nothing back
    blocked = IP(src="100.96.0.77", dst=APP4) / ICMP(type=8, id=5)
    assert ingress(loaded, blocked).verdict == Verdict.UNKNOWN
    assert reply(loaded, IP(src=APP4, dst="100.96.0.77") / ICMP(type=0, id=5)).retval == XDP_DROP


def test_icmp_errors_about_a_tracked_flow_pass_with_it(loaded):
    """Path MTU discovery through a connector: "fragmentation needed" (and its ICMPv6 peer,
    "packet too big") quoting the device's packet of a live flow pass; errors about anything
    else, or quoting another device's packet, do not."""
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded
    ssh = IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="A") / (b"x" * 100)
    ssh6 = IPv6(src=ANN6, dst=APP6) / UDP(sport=40007, dport=5353) / (b"x" * 100)
    router4, router6 = "10.20.0.254", "fd20::fe"
    too_big = IP(src=router4, dst=ANN4) / ICMP(type=3, code=4, nexthopmtu=1300) / bytes(ssh)
    too_big6 = IPv6(src=router6, dst=ANN6) / ICMPv6PacketTooBig(mtu=1280) / bytes(ssh6)
    for err in (too_big, too_big6):
        assert reply(loaded, err).reason == Reason.NOT_REPLY          # no flow yet
    assert ingress(loaded, ssh).retval == XDP_PASS and ingress(loaded, ssh6).retval == XDP_PASS
    for err in (too_big, too_big6,
                IP(src=router4, dst=ANN4) / ICMP(type=11) / bytes(ssh)[:28],     # the shortest quote
                IPv6(src=router6, dst=ANN6) / ICMPv6TimeExceeded() / bytes(ssh6),
                IPv6(src=APP6, dst=ANN6) / ICMPv6DestUnreach(code=4) / bytes(ssh6)):
        got = reply(loaded, err)
        assert (got.retval, got.reason) == (XDP_PASS, Reason.REPLY), err.summary()
    other_port = IP(src=ANN4, dst=APP4) / TCP(sport=40001, dport=22, flags="A")
    for err in (IP(src=router4, dst=ANN4) / ICMP(type=3, code=4) / bytes(other_port),     # no such flow
                IP(src=router4, dst=BOB4) / ICMP(type=3, code=4) / bytes(ssh),            # not bob's packet
                IP(src=router4, dst=ANN4) / ICMP(type=5) / bytes(ssh),                    # a redirect
                IP(src=router4, dst=ANN4) / ICMP(type=3, code=4) / bytes(ssh)[:24]):      # quote too short
        assert reply(loaded, err).retval == XDP_DROP, err.summary()
    loaded.next_epoch()              # a change: errors do not re-decide, they wait for the flow
    assert reply(loaded, too_big).retval == XDP_DROP


def test_a_drop_towards_a_device_names_the_device(loaded):
    got = reply(loaded, IP(src=APP4, dst=BOB4) / UDP(sport=5353, dport=40000))
    assert got.verdict == Verdict.BLOCK and got.device == 2   # bob-phone, the second device


def test_a_policy_change_revokes_open_flows_at_their_next_reply(loaded):
    ssh = IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="A")
    web = IP(src=BOB4, dst=APP4) / TCP(sport=40001, dport=8080, flags="A")
    for fwd in (ssh, web):
        assert ingress(loaded, fwd).retval == XDP_PASS
        assert reply(loaded, reverse(fwd)).retval == XDP_PASS
    # ssh is no longer allowed; the new tables are in (zt_ct is pinned: it outlives them, as on
    # a gateway) and the epoch moves on, as the gateway's kernel does after every change.
    revoked = Policy("block", tuple(r for r in POLICY.rules if r.name != "ssh-dev"))
    loaded.load(compile_policy(revoked, IDS, loaded.layout))
    loaded.next_epoch()
    # No packet from the device needed: the next reply decides its flow again.
    got = reply(loaded, reverse(ssh))
    assert (got.retval, got.verdict, got.reason, got.device) == (XDP_DROP, Verdict.BLOCK, Reason.REVOKED, 1)
    assert reply(loaded, reverse(ssh)).reason == Reason.NOT_REPLY      # and its entry is gone
    assert ingress(loaded, ssh).verdict == Verdict.BLOCK
    # a flow the new policy still allows goes on, decided once more and stamped
    assert (reply(loaded, reverse(web)).reason, reply(loaded, reverse(web)).reason) == (Reason.REPLY, Reason.REPLY)


def test_a_disabled_device_loses_its_replies(loaded):
    fwd = IP(src=ANN4, dst=APP4) / UDP(sport=40004, dport=5353)
    assert ingress(loaded, fwd).retval == XDP_PASS
    # ann-laptop's sources cleared in place (what `device disable` writes), then the epoch
    loaded.set_sources([(ipaddress.ip_address(ANN4), 0, 0), (ipaddress.ip_address(ANN6), 0, 0)])
    loaded.next_epoch()
    assert reply(loaded, reverse(fwd)).reason == Reason.REVOKED


def tracked_flows(loaded):
    """Three allowed flows, tracked: ann's ssh (IPv4) and dns (IPv6), and bob's web."""
    flows = (IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="A"),
             IPv6(src=ANN6, dst=APP6) / UDP(sport=40007, dport=5353),
             IP(src=BOB4, dst=APP4) / TCP(sport=40001, dport=8080, flags="A"))
    for fwd in flows:
        assert ingress(loaded, fwd).retval == XDP_PASS
    return flows


def test_a_removed_device_s_flows_are_forgotten(loaded):
    """Its address may go to another device, which must not inherit a way back: the gateway
    removes the flows of a removed or disabled device's addresses (Program.forget_flows)."""
    ssh, dns6, web = tracked_flows(loaded)
    assert loaded.forget_flows([ipaddress.ip_address(ANN4), ipaddress.ip_address(ANN6)]) == 2
    assert reply(loaded, reverse(ssh)).reason == Reason.NOT_REPLY
    assert reply(loaded, reverse(dns6)).reason == Reason.NOT_REPLY
    assert reply(loaded, reverse(web)).reason == Reason.REPLY          # bob's flow stays


def test_the_flows_of_devices_no_longer_enabled_are_forgotten(loaded):
    """What the gateway does after a rebuild or at start (a device cut while its flows could
    not be forgotten): every flow that no enabled device's address opened goes."""
    ssh, dns6, web = tracked_flows(loaded)
    assert loaded.forget_flows_except([ipaddress.ip_address(BOB4), ipaddress.ip_address(ANN6)]) == 1
    assert reply(loaded, reverse(ssh)).reason == Reason.NOT_REPLY
    assert reply(loaded, reverse(dns6)).reason == Reason.REPLY
    assert reply(loaded, reverse(web)).reason == Reason.REPLY


def test_forgetting_skips_a_flow_that_went_meanwhile(loaded):
    """A revoked flow's reply deletes its entry in the kernel; if that happens between
    forget_flows' read and its delete, the batch must go on past the missing key (CI once
    failed there with ENOENT)."""
    from dataplane.libbpf import delete_keys
    flows = [IP(src=ANN4, dst=APP4) / UDP(sport=41000 + i, dport=5353) for i in range(5)]
    for fwd in flows:
        assert ingress(loaded, fwd).retval == XDP_PASS
    table = loaded.bpf["zt_ct"]
    keys = [k for k, _ in table.items_lookup_batch()]
    assert len(keys) == 5
    del table[keys[1]], table[keys[3]]               # gone before the delete, as in the race
    assert delete_keys(table, keys) == 3
    assert not list(table.keys())


def test_a_dry_run_of_a_reply_changes_nothing(loaded):
    fwd = IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="A")
    assert ingress(loaded, fwd).retval == XDP_PASS
    loaded.load(compile_policy(Policy("block", ()), IDS, loaded.layout))
    loaded.next_epoch()
    with loaded.on_one_cpu() as cpu:
        assert loaded.run(bytes(reverse(fwd)), cpu=cpu, reply=True, dry=True).reason == Reason.REVOKED
    assert len(list(loaded.bpf["zt_ct"].keys())) == 1        # a dry run deletes nothing


def test_an_expired_flow_is_not_honoured_before_it_is_evicted(loaded):
    fwd = IP(src=ANN4, dst=APP4) / UDP(sport=40004, dport=5353)
    assert ingress(loaded, fwd).retval == XDP_PASS
    # Replies keep a flow alive, as its device's packets do (a revoked flow ends by the epoch).
    for _ in range(3):
        assert reply(loaded, reverse(fwd)).retval == XDP_PASS
        time.sleep(UDP_TIMEOUT / 3)
    assert reply(loaded, reverse(fwd)).retval == XDP_PASS
    time.sleep(UDP_TIMEOUT + 0.1)                          # then nothing, for longer than the timeout
    assert len(list(loaded.bpf["zt_ct"].keys())) == 1     # still there, no longer honoured
    assert reply(loaded, reverse(fwd)).reason == Reason.NOT_REPLY
    assert ingress(loaded, fwd).retval == XDP_PASS          # the device speaks again: it lives
    assert reply(loaded, reverse(fwd)).retval == XDP_PASS

# Issue 13, finding 5: what the connector side lets back, bounded.

def test_a_server_side_syn_opens_nothing(loaded):
    """A reply never opens a connection: a SYN without ACK from the server's port to the
    device's port of a tracked flow is no reply (the device did not listen); its SYN-ACK is."""
    fwd = IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="S")
    assert ingress(loaded, fwd).retval == XDP_PASS
    for fwd6 in (IPv6(src=ANN6, dst=APP6) / TCP(sport=40006, dport=22, flags="S"),):
        assert ingress(loaded, fwd6).retval == XDP_PASS
    for syn in (IP(src=APP4, dst=ANN4) / TCP(sport=22, dport=40000, flags="S"),
                IP(src=APP4, dst=ANN4) / TCP(sport=22, dport=40000, flags="SE"),
                IPv6(src=APP6, dst=ANN6) / TCP(sport=22, dport=40006, flags="S")):
        got = reply(loaded, syn)
        assert (got.retval, got.reason) == (XDP_DROP, Reason.NOT_REPLY), syn.summary()
    assert reply(loaded, IP(src=APP4, dst=ANN4) / TCP(sport=22, dport=40000, flags="SA")).reason == Reason.REPLY
    assert reply(loaded, IP(src=APP4, dst=ANN4) / TCP(sport=22, dport=40000, flags="A")).reason == Reason.REPLY


def test_only_an_echo_request_opens_an_icmp_flow(loaded):
    """Another ICMP message from a device (allowed by the icmp rule) carries no echo id: it
    must not make a flow that an echo reply with id 0 answers."""
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply
    udp = IP(src=APP4, dst=ANN4) / UDP(sport=5353, dport=40004)
    udp6 = IPv6(src=APP6, dst=ANN6) / UDP(sport=5353, dport=40007)
    for unreach, echo_reply in ((IP(src=ANN4, dst=APP4) / ICMP(type=3, code=3) / bytes(udp),
                                 IP(src=APP4, dst=ANN4) / ICMP(type=0, id=0, seq=1)),
                                (IPv6(src=ANN6, dst=APP6) / ICMPv6DestUnreach(code=4) / bytes(udp6),
                                 IPv6(src=APP6, dst=ANN6) / ICMPv6EchoReply(id=0, seq=1))):
        assert ingress(loaded, unreach).verdict == Verdict.ALLOW
        got = reply(loaded, echo_reply)
        assert (got.retval, got.reason) == (XDP_DROP, Reason.NOT_REPLY), echo_reply.summary()


def test_only_the_server_says_its_port_is_closed(loaded):
    """An error whose sender is not the flow's server is taken for a router's on the way: it
    may say the path failed (unreachable network or host, fragmentation needed, time exceeded),
    never what only the server knows (its port or protocol is closed)."""
    from scapy.layers.inet6 import ICMPv6DestUnreach
    dns = IP(src=ANN4, dst=APP4) / UDP(sport=40004, dport=5353) / (b"x" * 8)
    dns6 = IPv6(src=ANN6, dst=APP6) / UDP(sport=40007, dport=5353) / (b"x" * 8)
    assert ingress(loaded, dns).retval == XDP_PASS and ingress(loaded, dns6).retval == XDP_PASS
    router4, router6 = "10.20.0.254", "fd20::fe"
    for code in (2, 3):                                   # protocol, port unreachable
        assert reply(loaded, IP(src=router4, dst=ANN4) / ICMP(type=3, code=code) / bytes(dns)).retval == XDP_DROP
        assert reply(loaded, IP(src=APP4, dst=ANN4) / ICMP(type=3, code=code) / bytes(dns)).reason == Reason.REPLY
    assert reply(loaded, IP(src=router4, dst=ANN4) / ICMP(type=11, code=1) / bytes(dns)).retval == XDP_DROP
    assert reply(loaded, IPv6(src=router6, dst=ANN6) / ICMPv6DestUnreach(code=4) / bytes(dns6)).retval == XDP_DROP
    assert reply(loaded, IPv6(src=APP6, dst=ANN6) / ICMPv6DestUnreach(code=4) / bytes(dns6)).reason == Reason.REPLY
    for code in (0, 1, 4):                                # network, host unreachable; fragmentation needed
        assert reply(loaded, IP(src=router4, dst=ANN4) / ICMP(type=3, code=code) / bytes(dns)).reason == Reason.REPLY
    assert reply(loaded, IPv6(src=router6, dst=ANN6) / ICMPv6DestUnreach(code=3) / bytes(dns6)).reason == Reason.REPLY


def test_an_error_s_quote_lies_within_its_ip_length(loaded):
    """Bytes past the IP length are padding: a quote cut by the IP length is too short, whatever
    follows it in the frame."""
    ssh = IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="A")
    assert ingress(loaded, ssh).retval == XDP_PASS
    err = IP(src="10.20.0.254", dst=ANN4) / ICMP(type=3, code=4) / bytes(ssh)[:28]
    assert reply(loaded, err).reason == Reason.REPLY
    cut = bytearray(bytes(err))
    cut[2:4] = (20 + 8 + 27).to_bytes(2, "big")            # the IP length ends a byte into the ports
    got = reply(loaded, bytes(cut))
    assert (got.retval, got.reason) == (XDP_DROP, Reason.NOT_REPLY)
    ssh6 = IPv6(src=ANN6, dst=APP6) / UDP(sport=40007, dport=5353)
    assert ingress(loaded, ssh6).retval == XDP_PASS
    from scapy.layers.inet6 import ICMPv6PacketTooBig
    err6 = bytearray(bytes(IPv6(src="fd20::fe", dst=ANN6) / ICMPv6PacketTooBig(mtu=1280) / bytes(ssh6)))
    assert reply(loaded, bytes(err6)).reason == Reason.REPLY
    err6[4:6] = (8 + 40 + 7).to_bytes(2, "big")
    assert reply(loaded, bytes(err6)).retval == XDP_DROP


def test_an_error_after_long_extension_headers_is_read_where_it_lies(loaded):
    """The ICMPv6 header may lie past 1 KiB of extension headers: the quote is read there, not
    at an offset folded back into the headers (where a sender could place a quote of its choice)."""
    dns6 = IPv6(src=ANN6, dst=APP6) / UDP(sport=40007, dport=5353)
    assert ingress(loaded, dns6).retval == XDP_PASS
    from scapy.layers.inet6 import ICMPv6PacketTooBig
    fake = bytes(ICMPv6PacketTooBig(mtu=1280) / bytes(dns6))[:56]
    options = bytes([58, 128]) + b"\x00" * 6 + fake                  # 1032 bytes of Destination Options
    options += b"\x00" * (1032 - len(options))
    unknown_type = bytes([200, 0, 0, 0]) + b"\x00" * 4               # an ICMPv6 informational type
    pkt = IPv6(src="fd20::fe", dst=ANN6, nh=60) / Raw(options + unknown_type)
    assert (40 + 1032) & 0x3ff == 48                                 # where the folded offset pointed
    got = reply(loaded, pkt)
    assert got.retval == XDP_DROP, got
    real = IPv6(src="fd20::fe", dst=ANN6, nh=60) / Raw(options + bytes(ICMPv6PacketTooBig(mtu=1280) / bytes(dns6)))
    assert reply(loaded, real).reason == Reason.REPLY
