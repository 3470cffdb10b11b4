"""nftables beside ztgate's changes (issue 15), in the same bench run and at the same scale:
the time nft takes to add one rule, remove one rule, and add one element to a principal's
set (a device joining it), on the bench's deployment loaded as an engineer writes it
(scripts/benchnft.py: rule-major, a named set of device addresses per principal).

Two ways, N changes of each kind each (scripts/benchchanges.py's N):
- command: `nft add rule ...`, one process per change as an engineer runs it, timed from the
  process's start to its exit (nft exits once the kernel has committed the change). A worker
  inside the namespace starts them, so no `ip netns exec` is on the clock;
- in-process: the same command text through Debian's python3-nftables (libnftables), in one
  process, timed around each call (left out, and said so, where the binding is missing).

The rule added is a block rule for one user's device addresses to one address and port (the
one scripts/benchchanges.py adds through the gateway), appended to the chain, with a comment
that finds its handle for the removal (the handles are read untimed, once, between the two).

The table lives in a network namespace the bench creates and deletes afterwards, also on
failure or SIGTERM: the host's own ruleset is never touched. nft does not load the large
deployment's whole ruleset in useful time (scripts/benchtraffic.py: more than 18 min), so
the rules are loaded in precedence order, chunk after chunk, while a time budget lasts
(default 120 s); the result says how many of the deployment's rules were loaded.

    scripts/benchnftchanges.py [N] [small|medium|large]     (standalone; default 10 small)
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
TABLE, HOOK = "ztbench", "forward"
DST = "10.99.99.1"               # scripts/benchchanges.py's destination for its rule adds
NEW_DEVICES = "100.110.0.0"      # in the tunnel pool (100.96.0.0/12), above the bench's devices
KINDS = ("add rule", "delete rule", "add element")


def run(dep, repeats: int, log, scale: str, budget_s: float = 120.0, kind_budget_s: float = 60.0) -> dict:
    """Load DEP as nftables in a namespace of its own (as many rules as load in BUDGET_S), then
    time REPEATS changes of each kind, both ways; a kind stops early once its changes took
    KIND_BUDGET_S (at the large scale one element add takes minutes: n says how many were
    timed). The namespace goes whatever happens."""
    import benchnft

    netns = f"ztnft-{secrets.token_hex(3)}"
    previous = signal.signal(signal.SIGTERM, _exit_on_term)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        loaded = _load(netns, benchnft.increments(dep.policy, dep.identities, TABLE, HOOK), budget_s)
        log(f"nftables ({scale}): {loaded['rules_loaded']} of {len(dep.policy.rules)} rules "
            f"({loaded['nft_rules']} nft rules) loaded in {loaded['load_s']:.1f} s; "
            f"timing {repeats} changes of each kind")
        spec = {"repeats": repeats, "kind_budget_s": kind_budget_s, "changes": _changes(dep, repeats, loaded["sets"])}
        timed = _in_worker(netns, spec, scale)
        for way, kinds in timed["ways"].items():
            if kinds:
                log(f"nftables ({scale}), {way}: " + ", ".join(
                    f"{k} p50 {_pct(v, 50) * 1000:.1f} ms p99 {_pct(v, 99) * 1000:.1f} ms" for k, v in kinds.items()))
        return {"rules_total": len(dep.policy.rules), **{k: v for k, v in loaded.items() if k != "sets"},
                "budget_s": budget_s, **timed}
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        signal.signal(signal.SIGTERM, previous)


LIKE = {"add rule": "rule add", "delete rule": "rule remove", "add element": "group member add"}


def report(result: dict) -> tuple[str, list]:
    """nftables' heading and table rows, printed under ztgate's for the same scale (scripts/bench)."""
    loaded = (f"all {result['rules_total']} rules" if result["complete"] else
              f"the first {result['rules_loaded']} of {result['rules_total']} rules, all that loaded before the "
              f"{result['budget_s']:.0f} s budget ran out: the whole ruleset does not load in useful time")
    heading = (f"nftables, same scale, same run ({loaded}; {result['nft_rules']} nft rules, loaded in "
               f"{result['load_s']:.1f} s; ms from a change's start to its end"
               + ("" if result["ways"].get("in-process") else f"; {result['binding']}") + "):")
    rows = [("change", "beside", "nft cmd p50", "p99", "n", "in-process p50", "p99", "n")]
    for kind in KINDS:
        cells = []
        for way in ("command", "in-process"):
            times = (result["ways"].get(way) or {}).get(kind)
            cells += [f"{_pct(times, q) * 1000:.1f}" for q in (50, 99)] + [str(len(times))] if times else ["-"] * 3
        rows.append((f"nft {kind}", LIKE[kind], *cells))
    return heading, rows


def _in_worker(netns: str, spec: dict, scale: str) -> dict:
    """Run the timing worker inside NETNS; on any failure its whole process group (the nft it
    may be running) goes with it."""
    worker = subprocess.Popen(["ip", "netns", "exec", netns, PYTHON, __file__, "--worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = worker.communicate(json.dumps(spec), timeout=3600)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    if worker.returncode != 0:
        raise RuntimeError(f"nftables ({scale}): the timing worker failed: {err.strip()[-2000:]}")
    return json.loads(out)


def _exit_on_term(signum, frame):
    raise SystemExit(f"benchnftchanges: signal {signum}")


def _load(netns: str, parts, budget_s: float) -> dict:
    """The table, then rules in chunks, while the budget lasts: stop before a chunk that the
    last one's time says would go past it."""
    started = time.perf_counter()
    parts = iter(parts)
    _nft_file(netns, next(parts), budget_s)      # the table, the chain, the sets of enabled devices
    rules, nft_rules, sets, chunk, last = 0, 0, [], 50, 0.0
    pending = [next(parts, None) for _ in range(chunk)]
    while pending and pending[0] is not None:
        text = "".join(p for p in pending if p is not None)
        elapsed = time.perf_counter() - started
        if elapsed + 2 * last > budget_s:        # (a chunk takes longer as the ruleset grows)
            break
        t = time.perf_counter()
        _nft_file(netns, text, budget_s)
        last = time.perf_counter() - t
        rules += sum(p is not None for p in pending)
        nft_rules += text.count("add rule ")
        sets += re.findall(r"^add set inet \S+ (p\d+_4) ", text, re.M)
        chunk = min(chunk * 2, 400) if last < 2 else chunk   # fewer, larger chunks while they are quick
        pending = [next(parts, None) for _ in range(chunk)]
    complete = not pending or pending[0] is None
    return {"rules_loaded": rules, "nft_rules": nft_rules, "load_s": time.perf_counter() - started,
            "complete": complete, "sets": sets}


def _nft_file(netns: str, text: str, timeout: float) -> None:
    got = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=text, capture_output=True,
                         text=True, timeout=timeout)
    if got.returncode != 0:
        raise RuntimeError(f"nft -f refused the bench's ruleset: {got.stderr.strip()[-2000:]}")


def _changes(dep, repeats: int, sets: list[str]) -> dict:
    """The command texts, per way: rule adds (a user's devices to DST:443, blocked), and element
    adds (a new device address into the loaded principals' IPv4 sets, in turn)."""
    import ipaddress

    users = [u for u in dep.identities.users if dep.devices_of.get(u.key)]
    taken = {a for d in dep.identities.devices for a in d.addresses}
    fresh = (a for a in ipaddress.IPv4Network(f"{NEW_DEVICES}/16") if a not in taken)
    out = {}
    for way in ("command", "in-process"):
        rules, elements = [], []
        for i in range(repeats):
            addrs = ", ".join(str(d.tunnel_ipv4) for d in dep.devices_of[users[i % len(users)].key])
            rules.append(f"add rule inet {TABLE} {HOOK} ip saddr {{ {addrs} }} ip daddr {DST} tcp dport 443 drop "
                         f'comment "bench-{way}-{i}"')
            if sets:
                elements.append(f"add element inet {TABLE} {sets[i % len(sets)]} {{ {next(fresh)} }}")
        out[way] = {"rules": rules, "elements": elements}
    return out


def _pct(values: list, q: float) -> float:
    from benchchanges import percentile
    return percentile(values, q)


# ---- the worker: runs inside the namespace (`--worker`, the spec on stdin, JSON on stdout) ----

def _worker(spec: dict) -> dict:
    try:
        import nftables
        binding = nftables.Nftables()
        binding_note = "python3-nftables"
    except ImportError:
        binding, binding_note = None, "python3-nftables is not installed: no in-process figures"

    def by_command(text: str) -> float:
        t = time.perf_counter()
        got = subprocess.run(["nft", text], capture_output=True, text=True)
        took = time.perf_counter() - t
        if got.returncode != 0:
            raise SystemExit(f"nft {text!r}: {got.stderr.strip()}")
        return took

    def in_process(text: str) -> float:
        t = time.perf_counter()
        rc, _, err = binding.cmd(text)
        took = time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"libnftables {text!r}: {err.strip()}")
        return took

    def timed(do, texts: list) -> list:
        """Each text's time, until all are done or their times add up to the kind's budget."""
        out = []
        for text in texts:
            if sum(out) >= spec["kind_budget_s"]:
                break
            out.append(do(text))
        return out

    ways = {}
    for way, do in (("command", by_command), ("in-process", in_process if binding else None)):
        if do is None:
            ways[way] = None
            continue
        texts = spec["changes"][way]
        added = timed(do, texts["rules"])
        elements = timed(do, texts["elements"])
        handles = _handles(way)
        if len(handles) != len(added):
            raise SystemExit(f"{way}: {len(handles)} of the {len(added)} rules added are in the chain")
        removed = timed(do, [f"delete rule inet {TABLE} {HOOK} handle {h}" for h in handles])
        if len(_handles(way)) != len(handles) - len(removed):
            raise SystemExit(f"{way}: the chain does not hold the rules left after {len(removed)} removals")
        ways[way] = {"add rule": added, "delete rule": removed, "add element": elements}
    return {"ways": ways, "binding": binding_note}


def _handles(way: str) -> list[int]:
    """The handles of this way's bench rules, in the order they were added (untimed). Read with
    a netlink dump of the rules alone: nft's own listing fetches every set's elements first,
    which takes minutes at the large scale."""
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=1)      # NFPROTO_INET
    try:
        found = [(r.get_attr("NFTA_RULE_USERDATA"), r.get_attr("NFTA_RULE_HANDLE")) for r in nft.get_rules()
                 if (r.get_attr("NFTA_RULE_TABLE"), r.get_attr("NFTA_RULE_CHAIN")) == (TABLE, HOOK)]
    finally:
        nft.close()
    mine = [(int(c.rsplit("-", 1)[1]), h) for c, h in found if c and c.startswith(f"bench-{way}-")]
    return [h for _, h in sorted(mine)]


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        print(json.dumps(_worker(json.load(sys.stdin))))
        sys.exit(0)
    sys.path[:0] = [str(REPO), str(REPO / "scripts")]
    import benchgen

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    name = sys.argv[2] if len(sys.argv) > 2 else "small"
    result = run(benchgen.build(name, random.Random(f"1:{name}")), n, lambda m: print(m, file=sys.stderr), name)
    print(json.dumps(result, indent=2))
