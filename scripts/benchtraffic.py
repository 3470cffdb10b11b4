#!/usr/bin/env python3
"""The bench's real-traffic leg: ztgate in a forwarding path beside nftables, on real packets.

    gen namespace              fwd namespace (ip_forward)                sink namespace
    trafgen, 512 flows  --->  [in] the case under test  [out]  --->  XDP: count, drop
                      veth                                     veth

At 10, 1k and 10k rules of the bench's generator (scripts/benchgen.py: small, medium, large),
trafgen sends 512 flows of TCP SYNs and UDP datagrams, from the deployment's device addresses
to destinations its rules allow (checked by the reference evaluator), as fast as one CPU lets
it; the sink counts what was forwarded to it. Four cases on fwd's ingress veth, in one run:

    unfiltered   plain forwarding, nothing on the path
    pass-all     an XDP program that passes every packet, attached the same way (same mode)
    ztgate       the engine, built, filled and attached by `ztgate dataplane attach`'s code
    nftables     the same policy as an engineer writes it (scripts/benchnft.py), forward hook

Each round measures every case once (in a rotating order, so that the host's noise falls on
all alike); the medians of the rounds are printed, with ztgate / pass-all (the issue's goal:
>= 0.95 at 10k rules) and nftables / unfiltered. The ratios are the medians of each round's own
ratio (two cases timed seconds apart share that moment's load; the medians of pps over rounds
need not), printed with their spread over rounds (lowest-highest), and the load average at the
start and the end of each scale: on a shared 2-core host compare ratios, not pps across runs.
Then ztgate against pass-all once more, paired closely (--paired S seconds): one trafgen runs
throughout while the program on fwd's ingress is swapped every 0.5 s (one netlink call), in
alternating order; each pair of slices shares that second's load, and the median of the pairs'
ratios, with its quartiles, is the figure least moved by the host's neighbours. Before timing, one pass of the 512 flows
must arrive whole through ztgate and through nftables (they allow the same flows).
At 10k rules nft does not load the engineer's ruleset in useful time here (26.5k nft rules
and 1.2M set elements: its first 2k rules alone took 41 s, the whole file more than 18 min),
so --nft-timeout leaves nftables out of a scale it cannot load.
Not part of the test suite. Needs root, trafgen (Debian's netsniff-ng) and nft.

examples:
  scripts/benchtraffic.py                         all three scales, 5 rounds of 3 s
  scripts/benchtraffic.py --only small medium --rounds 3 --seconds 2
  scripts/benchtraffic.py --mode generic --json
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
# bcc comes from Debian's dist-packages, which only the project's venv sees.
if Path(sys.prefix).resolve() != VENV.resolve():
    python = VENV / "bin" / "python"
    os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import benchgen  # noqa: E402
from benchnet import Path3  # noqa: E402
from control.model import TCP, UDP, Packet  # noqa: E402
from control.reference import decide  # noqa: E402

SCALES = {"small": 10, "medium": 1_000, "large": 10_000}     # benchgen's sizes, by their rules
PROTOS = {"both": (TCP, UDP), "tcp": (TCP,), "udp": (UDP,)}
CASES = ("unfiltered", "pass-all", "ztgate", "nftables")
GOAL = 0.95


def choose_flows(dep, rng: random.Random, count: int, protos: tuple = (TCP, UDP)) -> list[Packet]:
    """COUNT distinct IPv4 flows of PROTOS the policy allows: the generator's allowed packets,
    each with more source ports, every one checked with the reference evaluator. (A packet the
    generator drew as UDP may be sent as TCP, and the other way round, when the policy allows that too.)"""
    chosen = benchgen.choose_packets(dep, rng, 64)
    base = [p for p, _ in chosen["allowed"] if p.src.version == 4 and p.proto in (TCP, UDP)]
    flows, seen = [], set()
    for _ in range(count * 50):
        if len(flows) == count:
            break
        p = rng.choice(base)
        proto = p.proto if p.proto in protos else protos[0]
        flow = Packet(p.src, p.dst, proto, rng.randint(1024, 65535), p.dport)
        if flow not in seen and decide(dep.policy, dep.identities, flow).verdict == "allow":
            seen.add(flow)
            flows.append(flow)
    if len(flows) < count:
        raise SystemExit(f"benchtraffic: {dep.name}: only {len(flows)} allowed flows of {protos} found")
    return flows


def measure_scale(net: Path3, name: str, args, log) -> dict:
    """Set every case up once for this deployment, then time them round by round."""
    rng = random.Random(f"{args.seed}:{name}")
    t = time.perf_counter()
    dep = benchgen.build(name, rng)
    flows = choose_flows(dep, rng, args.flows, PROTOS[args.proto])
    log(f"{name}: {SCALES[name]} rules, {len(dep.identities.devices)} devices generated in "
        f"{time.perf_counter() - t:.1f} s; {len(flows)} flows")
    net.write_flows(flows)
    t = time.perf_counter()
    done = net.attach_ztgate(dep.policy, dep.identities, args.mode)
    log(f"{name}: ztgate attached in {time.perf_counter() - t:.1f} s ({done['mode']} XDP)")
    t = time.perf_counter()
    loaded = net.load_nftables(dep.policy, dep.identities, args.nft_timeout)
    nft_s = time.perf_counter() - t
    log(f"{name}: nftables " + (f"loaded in {nft_s:.1f} s" if loaded else f"not loaded in {args.nft_timeout:.0f} s: left out"))
    cases = CASES if loaded else tuple(c for c in CASES if c != "nftables")
    load = [os.getloadavg()[0]]
    try:
        for case in cases[2:]:
            net.use(case, args.mode)
            got = net.one_pass()
            if got != len(flows):
                raise SystemExit(f"benchtraffic: {name}: one pass of {len(flows)} allowed flows through {case}: "
                                 f"{got} arrived; the two would not decide alike")
        pps = {c: [] for c in cases}
        prog_ns = {c: [] for c in ("pass-all", "ztgate")}
        for r in range(args.rounds):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            for case in order:
                net.use(case, args.mode)
                rate, ns = net.rate(args.seconds, net.program_fd(case) if args.bpf_stats else None)
                pps[case].append(rate)
                if case in prog_ns and args.bpf_stats:
                    prog_ns[case].append(ns)
            log(f"{name}: round {r + 1}: " + ", ".join(f"{c} {pps[c][-1] / 1e3:.0f} kpps" for c in cases))
        paired = paired_ratios(net, args.mode, args.paired) if args.paired else []
    finally:
        net.use("unfiltered", args.mode)
        net.remove_ztgate()
        net.remove_nftables()
    load.append(os.getloadavg()[0])
    med = {c: statistics.median(v) for c, v in pps.items()}
    ratios = {"ztgate_vs_pass": per_round(pps, "ztgate", "pass-all"),
              "pass_vs_unfiltered": per_round(pps, "pass-all", "unfiltered")}
    if loaded:
        ratios["nft_vs_unfiltered"] = per_round(pps, "nftables", "unfiltered")
    return {"rules": SCALES[name], "devices": len(dep.identities.devices), "flows": len(flows),
            "nft_load_s": round(nft_s, 1) if loaded else None,
            "pps": med, "rounds": pps, "load": load,
            "ztgate_vs_pass": statistics.median(ratios["ztgate_vs_pass"]),
            "nft_vs_unfiltered": statistics.median(ratios["nft_vs_unfiltered"]) if loaded else None,
            "pass_vs_unfiltered": statistics.median(ratios["pass_vs_unfiltered"]),
            "ratio_rounds": ratios,
            "ns_over_pass": (1e9 / med["ztgate"] - 1e9 / med["pass-all"]),
            "program_ns": {c: statistics.median(v) for c, v in prog_ns.items() if v},
            "program_ns_rounds": prog_ns, "paired": paired}


def paired_ratios(net: Path3, mode: str, seconds: float, slice_s: float = 0.5) -> list[float]:
    """ztgate / pass-all delivered rates in adjacent slices under one running trafgen: the
    program swapped in place every SLICE_S (the pair's order alternating), for SECONDS."""
    sender = net.trafgen()
    out = []
    try:
        net.use("pass-all", mode)
        time.sleep(0.5)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rate = {}
            for case in (("pass-all", "ztgate") if len(out) % 2 == 0 else ("ztgate", "pass-all")):
                net.use(case, mode)
                time.sleep(0.05)        # (the swap's own moment is in neither slice)
                n0, t0 = net.count(), time.perf_counter()
                time.sleep(slice_s)
                rate[case] = (net.count() - n0) / (time.perf_counter() - t0)
            if sender.poll() is not None:
                raise SystemExit(f"benchtraffic: trafgen stopped: {sender.stderr.read()}")
            out.append(rate["ztgate"] / rate["pass-all"])
    finally:
        net.stop_trafgen(sender)
    return out


def per_round(pps: dict, case: str, base: str) -> list[float]:
    """CASE / BASE within each round: both timed seconds apart, under that moment's load."""
    return [a / b for a, b in zip(pps[case], pps[base])]


def spread(values: list[float], digits: int = 3) -> str:
    """Lowest-highest over the rounds."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def report(results: dict, args) -> None:
    kind = {"both": "TCP SYNs and UDP", "tcp": "TCP SYNs", "udp": "UDP"}[args.proto]
    print(f"\nreal traffic through a forwarding namespace: {args.flows} flows of {kind}, "
          f"{args.mode} XDP, median of {args.rounds} rounds of {args.seconds} s (kpps delivered)")
    rows = [("rules", *CASES, "ztgate/pass-all", "nft/unfiltered", "pass/unfiltered", "ztgate +ns/pkt")]
    for r in results.values():
        nft = "n/a" if r["nft_vs_unfiltered"] is None else f"{r['nft_vs_unfiltered']:.4f}"
        rows.append((str(r["rules"]), *(f"{r['pps'][c] / 1e3:.0f}" if c in r["pps"] else "n/a" for c in CASES),
                     f"{r['ztgate_vs_pass']:.3f}", nft, f"{r['pass_vs_unfiltered']:.3f}",
                     f"{r['ns_over_pass']:+.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print("ratios: the median of each round's own ratio; over the rounds (lowest-highest):")
    for r in results.values():
        print(f"  {r['rules']:>6} rules: ztgate/pass-all {spread(r['ratio_rounds']['ztgate_vs_pass'])}, "
              f"pass/unfiltered {spread(r['ratio_rounds']['pass_vs_unfiltered'])}"
              + (f", nft/unfiltered {spread(r['ratio_rounds']['nft_vs_unfiltered'], 4)}"
                 if "nft_vs_unfiltered" in r["ratio_rounds"] else "")
              + f"; load average {r['load'][0]:.1f} at the start, {r['load'][1]:.1f} at the end")
    if any(r["paired"] for r in results.values()):
        print("ztgate/pass-all paired in 0.5 s slices under one trafgen: median (quartiles) of the pairs:")
        for r in results.values():
            if r["paired"]:
                q = statistics.quantiles(r["paired"], n=4)
                print(f"  {r['rules']:>6} rules: {statistics.median(r['paired']):.3f} ({q[0]:.3f}-{q[2]:.3f}), "
                      f"{len(r['paired'])} pairs")
    if any(r["program_ns"] for r in results.values()):
        print("the programs' own mean ns a packet on this traffic (kernel.bpf_stats_enabled; median, "
              "lowest-highest over rounds), and the ratio they make on the path as measured (pass-all's "
              "ns a packet, 1e9/pps, against it plus ztgate's own ns over pass-all's: the path runs to "
              "completion on one CPU, so the program's time adds to it):")
        for r in results.values():
            own = r["program_ns"]
            est = ""
            if "ztgate" in own and "pass-all" in own:
                path = 1e9 / r["pps"]["pass-all"]
                est = f"; ratio from own time {path / (path + own['ztgate'] - own['pass-all']):.3f} " \
                      f"(path {path:.0f} ns a packet)"
            print(f"  {r['rules']:>6} rules: " + ", ".join(
                f"{c} {v:.0f} ns ({spread(r['program_ns_rounds'][c], 0)})" for c, v in own.items()) + est)
    large = [r for r in results.values() if r["rules"] == SCALES["large"]]
    if large:
        paired = large[0]["paired"]
        ratio = statistics.median(paired) if paired else large[0]["ztgate_vs_pass"]
        print(f"goal: ztgate >= {GOAL:.0%} of pass-all at 10k rules: {ratio:.1%} "
              f"({'met' if ratio >= GOAL else 'missed'}; {'paired slices' if paired else 'rounds'})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("examples:")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=tuple(SCALES), help="these scales (default all three)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported (default 5)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per case per round (default 3)")
    ap.add_argument("--flows", type=int, default=512, help="distinct flows (default 512)")
    ap.add_argument("--mode", choices=("native", "generic"), default="native", help="XDP mode (default native)")
    ap.add_argument("--cpu", type=int, default=1, help="the CPU trafgen (and so the whole path) runs on")
    ap.add_argument("--nft-timeout", type=float, default=120.0, metavar="S",
                    help="leave nftables out of a scale whose ruleset nft does not load in S seconds (default 120; "
                         "nft loads 10k rules expanded per principal in many minutes)")
    ap.add_argument("--proto", choices=tuple(PROTOS), default="both",
                    help="flows of TCP SYNs and UDP (both: the generator's mix), or only one kind")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="also the XDP programs' own mean ns a packet (kernel.bpf_stats_enabled, on while "
                         "pass-all and ztgate are timed: every program on the host pays a little for it)")
    ap.add_argument("--paired", type=float, default=20.0, metavar="S",
                    help="then S seconds of ztgate against pass-all in alternating 0.5 s slices under one "
                         "trafgen (default 20; 0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    log = (lambda msg: print(f"[benchtraffic] {msg}", file=sys.stderr, flush=True))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("benchtraffic: stopped"))   # cleans up on the way out
    results = {}
    with Path3(args.cpu) as net:
        for name in SCALES:
            if args.only is None or name in args.only:
                results[name] = measure_scale(net, name, args, log)
    if args.json:
        print(json.dumps({"mode": args.mode, "proto": args.proto, "rounds": args.rounds, "seconds": args.seconds,
                          "results": results}, indent=2))
    else:
        report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
