r"""The DNS slow path end to end in the lab (spec/POLICY.md "Hostnames", spec/LAB.md): devices
ask the lab's resolver (dnsmasq, 10.20.0.53) with `dig` in their namespaces, the answers go
through the gateway's NFQUEUE, and the demo policy's `staff-wiki-by-name` (wiki.lab.example
tcp 8080, 10.20.0.12) decides by what they taught. The lab's gateway learns for at least
`dns: min_ttl` = 5 s (the resolver's TTL is 1 s), so a test that needs nothing learned waits
for the name to expire.

    zt-alice / zt-bob --dig--> zt-gw (queue: question seen, answer learned, then released) --> zt-app dnsmasq

Runs under the lab lock, like tests/net/test_lab.py:
    flock /tmp/ztgate-lab.lock .venv/bin/python -m pytest -q tests/net/test_dns.py
"""
from __future__ import annotations

import random
import socket
import subprocess
import time

import dns.message
import dns.rrset
import pytest

from lab.lab import NS_ALICE, NS_APP, NS_BOB, NS_GW, RESOLVER
from tests.lab_cli import cli, cli_json, flow_events
from tests.lab_traffic import APP, http_page, inside, ns_socket
from tests.netns import wait_until

WIKI, NAME = "10.20.0.12", "wiki.lab.example"
MIN_TTL = 5


def dig(ns: str, name: str, *opts: str) -> list[str]:
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "dig", f"@{RESOLVER}", "+short", "+time=2",
                        "+tries=1", *opts, name], capture_output=True, text=True, timeout=15)
    return r.stdout.split() if r.returncode == 0 else []


def learned(name: str | None = None) -> list[dict]:
    return cli_json("dns", "list", *(("--name", name) if name else ()))["learned"]


def counters() -> dict:
    return cli_json("dns", "list")["counters"]


def forgotten(name: str = NAME) -> None:
    """Nothing learned for NAME any more (it expires at most min_ttl after the last answer)."""
    wait_until(lambda: not learned(name), timeout=MIN_TTL + 5, what=f"{name} to expire")


def connect_time(ns: str, dst: str = WIKI, port: int = 8080, timeout: float = 2.5) -> float | None:
    """Seconds a TCP connection took to open, or None if it did not. A SYN the gateway dropped
    is sent again after 1 s: an open under 0.9 s means the first SYN passed."""
    s = ns_socket(ns, timeout=timeout)
    t = time.monotonic()
    try:
        s.connect((dst, port))
        return time.monotonic() - t
    except OSError:
        return None
    finally:
        s.close()


def blocks(device: str, dst: str) -> list[dict]:
    return [e for e in flow_events("--device", device, "--verdict", "block") if e["dst"] == dst]


def send_from_app(src: str, dst: str, dport: int, payloads: list[bytes], pace: int = 0) -> None:
    """UDP datagrams from SRC:53 in zt-app (a raw socket: any source the app's host holds)."""
    from scapy.layers.inet import IP, UDP
    with inside(NS_APP):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with s:
        for i, p in enumerate(payloads):
            s.sendto(bytes(IP(src=src, dst=dst) / UDP(sport=53, dport=dport) / p), (dst, 0))
            if pace and i % pace == pace - 1:
                time.sleep(0.02)


def ask(ns: str, name: str, qid: int) -> socket.socket:
    """A device's own question to the resolver, from a socket the test keeps (its port is the flow's)."""
    s = ns_socket(ns, socket.SOCK_DGRAM, timeout=2)
    q = dns.message.make_query(name, "A")
    q.id = qid
    s.sendto(q.to_wire(), (RESOLVER, 53))
    s.recvfrom(4096)
    return s


def forged(name: str, qid: int, address: str = WIKI) -> bytes:
    q = dns.message.make_query(name, "A")
    q.id = qid
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "A", address))
    return r.to_wire()


# ---------------------------------------------------------------------------------------------

def test_the_chain_is_made_whole_replaced_and_removed():
    """In a namespace of its own (no lab): a second install (a gateway started after a crash)
    replaces the chain, never doubles it; remove leaves nothing, and says so."""
    import ipaddress
    from control.dns import netfilter
    ns = "zt-t-dnschain"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with inside(ns):
            resolvers = (ipaddress.ip_address("10.20.0.53"), ipaddress.ip_address("fd20::53"))
            for _ in range(2):
                netfilter.install("zt0", resolvers, 5300)
            for tool in ("iptables-legacy", "ip6tables-legacy"):
                rules = subprocess.run([tool, "-t", "mangle", "-S"], capture_output=True, text=True).stdout
                assert rules.count("-j ztdns-zt0") == 1 and rules.count("--queue-bypass") == 4, rules
            assert netfilter.remove("zt0") and not netfilter.remove("zt0")
            for tool in ("iptables-legacy", "ip6tables-legacy"):
                assert "ztdns" not in subprocess.run([tool, "-t", "mangle", "-S"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_with_no_slow_path_reading_the_queue_dns_passes():
    """The chain with no reader (a gateway stopped or crashed): --queue-bypass lets the
    question and the answer through, unlearned. Namespaces of its own: device - gateway - resolver."""
    import ipaddress
    from control.dns import netfilter
    dev, gw, res = "zt-t-dnsd", "zt-t-dnsg", "zt-t-dnsr"
    ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)
    try:
        for ns in (dev, gw, res):
            ip("netns", "add", ns)
        for ns, here, addr, net in ((dev, "ztt-d", "10.98.0.2", "10.98.0"), (res, "ztt-r", "10.99.0.53", "10.99.0")):
            ip("-n", gw, "link", "add", here, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", gw, "addr", "add", f"{net}.1/24", "dev", here)
            ip("-n", gw, "link", "set", here, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "default", "via", f"{net}.1")
        subprocess.run(["nsenter", f"--net=/run/netns/{gw}", "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        with inside(gw):
            netfilter.install("ztt-d", (ipaddress.ip_address("10.99.0.53"),), 5301)
        server = ns_socket(res, socket.SOCK_DGRAM, timeout=3)
        server.bind(("10.99.0.53", 53))
        client = ns_socket(dev, socket.SOCK_DGRAM, timeout=3)
        query = dns.message.make_query(NAME, "A").to_wire()
        client.sendto(query, ("10.99.0.53", 53))
        got, peer = server.recvfrom(4096)
        assert got == query
        server.sendto(forged(NAME, 1), peer)
        assert client.recvfrom(4096)[0] == forged(NAME, 1)
        counts = subprocess.run(["nsenter", f"--net=/run/netns/{gw}", "iptables-legacy", "-t", "mangle", "-L",
                                 netfilter.chain_name("ztt-d"), "-v", "-n", "-x"], capture_output=True, text=True).stdout
        assert [int(line.split()[0]) for line in counts.splitlines()[2:] if "udp" in line] == [1, 1], counts
        server.close()
        client.close()
    finally:
        for ns in (dev, gw, res):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_the_slow_path_queues_with_bypass(up):
    rules = subprocess.run(["nsenter", f"--net=/run/netns/{NS_GW}", "iptables-legacy", "-t", "mangle", "-S"],
                           capture_output=True, text=True, check=True).stdout
    queued = [line for line in rules.splitlines() if "NFQUEUE" in line]
    assert len(queued) == 4 and all("--queue-bypass" in line and RESOLVER in line for line in queued), rules
    assert cli_json("dns", "list")["enabled"]


def test_an_address_never_answered_is_blocked(up):
    forgotten()
    assert connect_time(NS_BOB, timeout=1.5) is None
    wait_until(lambda: blocks("bob-laptop", WIKI), timeout=5, what="the flow log's block of bob's SYN")


def test_a_name_resolved_passes_on_its_first_syn_and_lives_by_the_ttl_floor(up):
    forgotten()
    assert dig(NS_BOB, NAME) == [WIKI]
    took = connect_time(NS_BOB)
    assert took is not None and took < 0.9, f"bob's connection to {NAME} took {took} s: not its first SYN"
    rows = learned(NAME)
    assert [(r["address"], r["asker"]) for r in rows] == [(WIKI, "bob-laptop")]
    assert 0 < rows[0]["expires_in"] <= MIN_TTL
    page = http_page(NS_BOB, WIKI, 8080)
    assert page == f"ztgate lab wiki {WIKI}:8080, you are 100.96.0.3\n"
    time.sleep(2)                              # the record's TTL (1 s) is over; the floor (5 s) is not
    assert connect_time(NS_BOB) is not None
    # the flow log names the hostname the allow came from (the event's name token, resolved as
    # the log is written: a moment after the packet), in --json and after the rule in `ztgate logs`
    named = lambda: [e for e in flow_events("--device", "bob-laptop", "--verdict", "allow")
                     if e["dst"] == WIKI and e["dport"] == 8080 and "hostname" in e]
    wait_until(named, timeout=5, what="the flow log's allow of bob's connection to name its hostname")
    assert {(e["rule"], e["hostname"]) for e in named()} == {("staff-wiki-by-name", NAME)}
    assert f"staff-wiki-by-name ({NAME})" in cli("logs", "--device", "bob-laptop", "--verdict", "allow").stdout
    forgotten()
    before = len(blocks("alice-laptop", WIKI))
    assert connect_time(NS_ALICE, timeout=1.5) is None, "alice never resolved it, and it expired"
    wait_until(lambda: len(blocks("alice-laptop", WIKI)) > before, timeout=5, what="alice's block in the flow log")


def test_tcp_and_a_cname_chain_teach_every_name_of_the_chain(up):
    forgotten()
    assert dig(NS_ALICE, "docs.lab.example", "+tcp") == [NAME + ".", WIKI]
    assert {(r["name"], r["address"]) for r in learned()} >= {("docs.lab.example", WIKI), (NAME, WIKI)}
    took = connect_time(NS_ALICE)
    assert took is not None and took < 0.9


def test_an_answer_to_a_question_the_policy_did_not_allow_teaches_nothing(up):
    forgotten()
    cli("rule", "add", "t-no-dns-bob", "--action", "block", "--principal", "user:bob@example.com",
        "--proto", "udp", "--proto", "tcp", "--dst-cidr", f"{RESOLVER}/32", "--dst-port", "53", "--precedence", "250")
    try:
        assert dig(NS_BOB, NAME) == []            # the question never reaches the resolver
        s = ns_socket(NS_BOB, socket.SOCK_DGRAM, timeout=1)
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
        q = dns.message.make_query(NAME, "A")
        s.sendto(q.to_wire(), (RESOLVER, 53))   # dropped by the policy
        send_from_app(RESOLVER, "100.96.0.3", port, [forged(NAME, q.id)] * 3)   # the resolver's "answer"
        with pytest.raises(socket.timeout):
            s.recvfrom(4096)
        s.close()
        assert learned(NAME) == []
        assert connect_time(NS_BOB, timeout=1.5) is None
    finally:
        cli("rule", "remove", "t-no-dns-bob")


def test_spoofed_answers_teach_nothing(up):
    forgotten()
    before = counters()["refused"].get("unasked", 0)
    s = ask(NS_ALICE, "app.lab.example", 777)        # a real flow to the resolver, answered
    port = s.getsockname()[1]
    # on that flow, answers to a name alice did not ask, to an id she did not use, and a
    # second answer to her question; and one from an address that is not a resolver
    send_from_app(RESOLVER, "100.96.0.2", port, [forged(NAME, 777), forged(NAME, 778),
                                                 forged("app.lab.example", 777, WIKI)])
    send_from_app(APP, "100.96.0.2", port, [forged(NAME, 777)])
    wait_until(lambda: counters()["refused"].get("unasked", 0) >= before + 3, timeout=5,
               what="the forged answers refused as unasked")
    s.close()
    assert learned(NAME) == []
    assert ("app.lab.example", WIKI) not in {(r["name"], r["address"]) for r in learned()}
    assert connect_time(NS_ALICE, timeout=1.5) is None


def test_fuzzed_answers_through_the_real_queue(up):
    """10^4 answers on a real flow: scapy's fuzz of a DNS answer and byte mutations of it, and
    random bytes. The
    daemon stays up, nothing is learned, and the fast path goes on deciding."""
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.packet import fuzz
    forgotten()
    rng = random.Random(16)
    template = DNS(id=4242, qr=1, qd=DNSQR(qname=NAME), an=DNSRR(rrname=NAME, rdata=WIKI, ttl=300))
    good = bytes(template)
    payloads = []
    while len(payloads) < 2000:                                                      # scapy's fuzz of each field
        try:
            payloads.append(bytes(fuzz(template)))
        except Exception:       # a random field value scapy itself cannot build (seen: TypeError in rdlen)
            pass
    for _ in range(3000):                                                            # bytes flipped in an answer
        wire = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            wire[rng.randrange(len(wire))] = rng.randrange(256)
        payloads.append(bytes(wire))
    payloads += [rng.randbytes(rng.randint(1, 600)) for _ in range(5000)]             # random bytes
    rng.shuffle(payloads)
    s = ask(NS_ALICE, "app.lab.example", 4242)
    before = counters()
    t = time.monotonic()
    send_from_app(RESOLVER, "100.96.0.2", s.getsockname()[1], payloads, pace=50)
    wait_until(lambda: counters()["queued"] - before["queued"] >= 9000, timeout=60,
               what="the fuzzed answers through the queue")
    s.close()
    after = counters()
    assert time.monotonic() - t < 60
    assert after["learned"] == before["learned"]
    assert learned() == [] or all(r["name"] != NAME and r["address"] != WIKI for r in learned())
    assert cli_json("status")["program_id"]
    assert http_page(NS_ALICE, APP, 8080) is not None, "the fast path stopped deciding"
    assert connect_time(NS_ALICE, timeout=1.5) is None
