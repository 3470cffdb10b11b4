"""The DNS slow path's speed (issue 16): the latency an answer gains by going through the
slow path (p50/p99; goal <= 1 ms and <= 5 ms), and the answers per second it handles on one
core.

Latency is measured with real parts in namespaces of its own (not the lab's, so no lock):

    ztb-dev 10.98.0.2 --- ztb-gw (forwards; the slow path's chain and queue) --- ztb-res 10.99.0.53 (dnsmasq)

A client in ztb-dev asks dnsmasq N questions one after the other, first with the slow path
running in ztb-gw (its own process, as the gateway runs it: question and answer both through
the queue, the answer learned into control/learned.py's table before it is released), then
without it (its chain removed): the difference of the round trips' percentiles is what the
slow path adds. The slow path's own hold times (answer read to answer released) are reported
too. Answers per second: SlowPath.handle() on question/answer pairs in this process (one
thread, one core), each learned.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
DEV, GW, RES = "ztb-dev", "ztb-gw", "ztb-res"
RESOLVER, DEVICE = "10.99.0.53", "10.98.0.2"
NAME = "bench.lab.example"
GOAL_P50_MS, GOAL_P99_MS = 1.0, 5.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _netns_up() -> None:
    _netns_down()
    for ns in (DEV, GW, RES):
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    for ns, here, there, net in ((DEV, "ztb-d", "eth0", "10.98.0"), (RES, "ztb-r", "eth0", "10.99.0")):
        _ip("-n", GW, "link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        _ip("-n", GW, "addr", "add", f"{net}.1/24", "dev", here)
        _ip("-n", GW, "link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"{RESOLVER if ns == RES else DEVICE}/24", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "route", "add", "default", "via", f"{net}.1")
    subprocess.run(["nsenter", f"--net=/run/netns/{GW}", "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)


def _netns_down() -> None:
    for ns in (DEV, GW, RES):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _dnsmasq(folder: Path) -> subprocess.Popen:
    conf = folder / "dnsmasq.conf"
    conf.write_text(f"listen-address={RESOLVER}\nbind-interfaces\nport=53\nno-resolv\nno-hosts\nno-poll\n"
                    f"local-ttl=300\nuser=root\npid-file=\nhost-record={NAME},10.99.0.10\n")
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{RES}", "dnsmasq", "--keep-in-foreground",
                          f"--conf-file={conf}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return p


def _client_socket() -> socket.socket:
    from pyroute2 import netns
    fd = os.open(f"/run/netns/{DEV}", os.O_RDONLY)
    netns.pushns()
    try:
        netns.setns(fd)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    finally:
        netns.popns()
        os.close(fd)
    s.settimeout(1.0)
    s.connect((RESOLVER, 53))
    return s


def _round_trips(n: int) -> list[float]:
    import dns.message
    s = _client_socket()
    out = []
    with s:
        for i in range(n):
            q = dns.message.make_query(NAME, "A")
            wire = q.to_wire()
            t = time.perf_counter()
            s.send(wire)
            try:
                while dns.message.from_wire(s.recv(4096)).id != q.id:
                    pass
            except socket.timeout:
                continue
            out.append(time.perf_counter() - t)
    return out


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


def serve() -> int:
    """In ztb-gw: the slow path with a learned table, until SIGTERM; then its hold times as JSON."""
    import ipaddress
    from control.dns.settings import DnsConfig
    from control.dns.slowpath import SlowPath
    from control.learned import Learned

    table = Learned()
    learn = lambda taught, asker: sum(table.learn(n, a, ttl, asker) for n, a, ttl in taught)
    sp = SlowPath(DnsConfig(resolvers=(ipaddress.ip_address(RESOLVER),), queue=5399), "ztb-d", learn, str)
    sp.start()
    print("ready", flush=True)
    done = []
    signal.signal(signal.SIGTERM, lambda *_: done.append(1))
    while not done:
        time.sleep(0.1)
    sp.stop()
    print(json.dumps({"holds": list(sp.counters.holds), "learned": sp.counters.learned,
                      "refused": dict(sp.counters.refused)}), flush=True)
    return 0


def latency(n: int, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="ztb-dns-") as folder:
        _netns_up()
        resolver = _dnsmasq(Path(folder))
        try:
            _round_trips(50)                                   # warm the resolver and the ARP caches
            without = _round_trips(n)
            sp = subprocess.Popen(["nsenter", f"--net=/run/netns/{GW}", PYTHON, __file__, "--serve"],
                                  stdout=subprocess.PIPE, text=True, cwd=REPO)
            assert sp.stdout.readline().strip() == "ready", "the slow path did not start"
            _round_trips(50)
            with_sp = _round_trips(n)
            sp.send_signal(signal.SIGTERM)
            inside = json.loads(sp.communicate(timeout=30)[0].splitlines()[-1])
        finally:
            resolver.terminate()
            resolver.wait(timeout=10)
            _netns_down()
    ms = lambda v: round(v * 1000, 3)
    out = {"answers": n, "without_p50_ms": ms(_pct(without, 50)), "without_p99_ms": ms(_pct(without, 99)),
           "with_p50_ms": ms(_pct(with_sp, 50)), "with_p99_ms": ms(_pct(with_sp, 99)),
           "hold_p50_ms": ms(_pct(inside["holds"], 50)), "hold_p99_ms": ms(_pct(inside["holds"], 99)),
           "learned": inside["learned"], "refused": inside["refused"]}
    out["added_p50_ms"] = round(out["with_p50_ms"] - out["without_p50_ms"], 3)
    out["added_p99_ms"] = round(out["with_p99_ms"] - out["without_p99_ms"], 3)
    log(f"DNS slow path: {n} answers, added p50 {out['added_p50_ms']} ms, p99 {out['added_p99_ms']} ms")
    return out


def throughput(n: int) -> float:
    """Answers per second through SlowPath.handle() (read, match, learn), one thread."""
    import ipaddress

    import dns.message
    import dns.rrset
    from scapy.layers.inet import IP, UDP

    from control.dns.settings import DnsConfig
    from control.dns.slowpath import SlowPath
    from control.learned import Learned

    table = Learned(max_total=1 << 22, max_per_name=4, max_per_device=1 << 22)   # one device asks them all
    learn = lambda taught, asker: sum(table.learn(n_, a, ttl, asker) for n_, a, ttl in taught)
    sp = SlowPath(DnsConfig(resolvers=(ipaddress.ip_address(RESOLVER),)), "zt0", learn, str)
    rng = random.Random(1)
    pairs = []
    for i in range(n):
        q = dns.message.make_query(f"h{i}.lab.example", "A")
        a = dns.message.make_response(q)
        a.answer.append(dns.rrset.from_text(f"h{i}.lab.example.", 300, "IN", "A", f"10.{rng.randrange(256)}.{i >> 8 & 255}.{i & 255}"))
        port = 10000 + i % 50000
        pairs.append((bytes(IP(src=DEVICE, dst=RESOLVER) / UDP(sport=port, dport=53) / q.to_wire()),
                      bytes(IP(src=RESOLVER, dst=DEVICE) / UDP(sport=53, dport=port) / a.to_wire())))
    t = time.perf_counter()
    for question, answer in pairs:
        sp.handle(question)
        sp.handle(answer)
    elapsed = time.perf_counter() - t
    assert sp.counters.learned == n, sp.snapshot()
    return n / elapsed


def run(n: int, log) -> dict:
    out = latency(n, log)
    out["answers_per_s"] = round(throughput(max(n, 5000)))
    log(f"DNS slow path: {out['answers_per_s']} answers/s (question and answer read, matched, learned)")
    out["pass"] = out["added_p50_ms"] <= GOAL_P50_MS and out["added_p99_ms"] <= GOAL_P99_MS
    return out


def checks(out: dict) -> list[dict]:
    """The goals as rows of the bench's targets table."""
    return [{"target": f"dns: added latency {p}", "value": out[f"added_{p}_ms"], "limit": goal, "unit": "ms",
             "pass": out[f"added_{p}_ms"] <= goal, "gap": round(out[f"added_{p}_ms"] - goal, 3)}
            for p, goal in (("p50", GOAL_P50_MS), ("p99", GOAL_P99_MS))]


def report(out: dict) -> None:
    print("\nDNS slow path (answers through NFQUEUE, learned before release; goal: added p50 <= 1 ms, p99 <= 5 ms):")
    rows = [("", "p50 ms", "p99 ms"),
            ("round trip without", out["without_p50_ms"], out["without_p99_ms"]),
            ("round trip with", out["with_p50_ms"], out["with_p99_ms"]),
            ("added", out["added_p50_ms"], out["added_p99_ms"]),
            ("held in the slow path", out["hold_p50_ms"], out["hold_p99_ms"])]
    for r in rows:
        print(f"  {r[0]:<24}{r[1]:>10}{r[2]:>10}")
    print(f"  answers/s on one core (handle: read, match, learn): {out['answers_per_s']}"
          f"   {'PASS' if out['pass'] else 'MISS'}")


if __name__ == "__main__":
    sys.path[:0] = [str(REPO)]
    if sys.argv[1:] == ["--serve"]:
        sys.exit(serve())
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, lambda m: print(f"[bench] {m}", file=sys.stderr))
    report(result)
