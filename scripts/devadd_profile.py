"""A narrow harness for device changes at one of the bench's scales (issue 15's device add).

  profile    one gateway in this process (in a throwaway network namespace): N device adds,
             group member adds and device disables timed, gc's collections over them, then
             N more of each under cProfile (top functions by cumulative and own time)
  compare    real daemons, one per source tree (e.g. main's checkout and this one), each on
             its own namespace, interface, pins and store; the same changes sent to each in
             turn, interleaved (the order alternating), p50/p99 of each tree and kind

The deployment is scripts/benchgen's, written straight into each store (the tree's own
Store) before its gateway starts: the gateway's start builds it whole, as `policy apply`
would, without the minute of YAML. Run the large scale under `flock /tmp/ztgate-large.lock`.

  .venv/bin/python scripts/devadd_profile.py profile --scale large --changes 50
  .venv/bin/python scripts/devadd_profile.py compare /tmp/main-tree . --scale large --changes 50
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PYTHON = str(HERE / ".venv" / "bin" / "python")


def percentile(values: list, q: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, -(-len(ranked) * q // 100) - 1))]


def summary(times: list) -> str:
    slowest = sorted(range(len(times)), key=times.__getitem__)[-3:][::-1]
    return (f"p50 {percentile(times, 50) * 1e3:6.1f} ms  p99 {percentile(times, 99) * 1e3:6.1f} ms  (n={len(times)}; "
            f"slowest #{', #'.join(f'{i} {times[i] * 1e3:.1f}' for i in slowest)})")


def prepare(tree: Path, scale: str, seed: int) -> tuple[Path, Path, str]:
    """A state directory whose store holds the deployment, and a gateway config: written by
    TREE's own code (a child process), so an old tree writes its own schema."""
    token = secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix="ztdevadd-"))
    code = f"""
import random, sys, yaml
sys.path[:0] = [{str(tree)!r}, {str(tree / 'scripts')!r}]
import benchgen
from control.store import Store
dep = benchgen.build({scale!r}, random.Random("{seed}:{scale}"))
store = Store({str(tmp / 'state' / 'ztgate.db')!r})
with store.change(0, "harness", {{}}) as tx:
    tx.replace_policy(dep.policy)
    tx.replace_identities(dep.identities)
users = [u.email for u in dep.identities.users if dep.devices_of.get(u.key)]
open({str(tmp / 'users')!r}, "w").write("\\n".join(users))
"""
    subprocess.run([PYTHON, "-c", code], check=True, cwd=tree)
    config = tmp / "gateway.yaml"
    import yaml
    config.write_text(yaml.safe_dump({
        "interface": f"ztd{token}", "endpoint": "198.18.0.1:51820", "state_dir": str(tmp / "state"),
        "socket": str(tmp / "ztgate.sock"), "flow_log": str(tmp / "flows.log"), "metrics": None,
        "bpf_pin_dir": f"/sys/fs/bpf/ztgate-devadd-{token}"}))
    return tmp, config, f"ztdevadd-{token}"


def cleanup(tree: Path, tmp: Path, config: Path, netns: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway", "teardown", "--config",
                    str(config)], cwd=tree, capture_output=True)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


OPS = {"device.add": "device_add", "group.member": "group_member", "device.set_enabled": "device_set_enabled"}


def changes(users: list, n: int, offset: int) -> dict:
    """Kind -> (op, args) of N changes each, as scripts/benchchanges.py makes them (names from OFFSET)."""
    from control.wireguard import generate_keypair
    return {
        "device add": [("device.add", dict(name=f"h-dev-{offset + i}", email=users[(offset + i) % len(users)],
                                           public_key=generate_keypair()[1])) for i in range(n)],
        "group member add": [("group.member", dict(group=f"h-group-{offset + i}", email=users[(offset + i) % len(users)],
                                                   present=True)) for i in range(n)],
        "device disable": [("device.set_enabled", dict(name=f"h-dev-{offset + i}", enabled=False)) for i in range(n)]}


# ---------------------------------------------------------------------------------------------
# profile: one gateway in this process

def profile(args) -> None:
    tmp, config, netns = prepare(HERE, args.scale, args.seed)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        env = dict(os.environ, PYTHONPATH=str(HERE))
        subprocess.run(["nsenter", f"--net=/run/netns/{netns}", PYTHON, __file__, "_inner", str(config), str(tmp / "users"),
                        str(args.changes), str(int(args.gc_freeze))], check=True, cwd=HERE, env=env)
    finally:
        cleanup(HERE, tmp, config, netns)


def inner(config_path: str, users_path: str, n: int, freeze: int) -> None:
    import cProfile
    import gc
    import pstats
    from control.config import load_config
    from control.gateway import Gateway
    users = Path(users_path).read_text().split("\n")
    t = time.perf_counter()
    gw = Gateway(load_config(config_path))
    gw.start()
    print(f"started in {time.perf_counter() - t:.1f} s", flush=True)
    if freeze:
        gc.collect()
        gc.freeze()
    pauses = []
    gc.callbacks.append(lambda phase, info: pauses.append((phase, info["generation"], time.perf_counter())))

    def run(batch) -> list:
        out = []
        for op, a in batch:
            fn = getattr(gw, OPS[op])
            t0 = time.perf_counter()
            fn(0, **a)
            out.append(time.perf_counter() - t0)
        return out
    for kind, batch in changes(users, n, 0).items():
        print(f"{kind:17s} {summary(run(batch))}")
    spans = [(g, t1 - t0) for (_, g, t0), (_, _, t1) in zip(pauses[::2], pauses[1::2])]
    for gen in (0, 1, 2):
        mine = [t for g, t in spans if g == gen]
        print(f"gc generation {gen}: {len(mine)} collections, longest {max(mine, default=0) * 1e3:.1f} ms")
    for kind, batch in changes(users, n, n).items():
        prof = cProfile.Profile()
        prof.enable()
        run(batch)
        prof.disable()
        print(f"---- {kind}, profiled")
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(12)


# ---------------------------------------------------------------------------------------------
# compare: real daemons, one per tree, interleaved

def compare(args) -> None:
    from control.api import Client
    trees = [Path(t).resolve() for t in args.trees]
    setups, daemons = [], []
    try:
        for tree in trees:
            setups.append(prepare(tree, args.scale, args.seed))
        for tree, (tmp, config, netns) in zip(trees, setups):
            subprocess.run(["ip", "netns", "add", netns], check=True)
            daemons.append(subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway", "run", "--config", str(config)],
                cwd=tree, stdout=subprocess.DEVNULL, stderr=open(tmp / "daemon.log", "w")))
        clients = []
        for (tmp, _, _), proc in zip(setups, daemons):
            clients.append(wait_client(str(tmp / "ztgate.sock"), proc))
        users = Path(setups[0][0] / "users").read_text().split("\n")
        kinds = changes(users, args.changes, 0)
        times = {(t, k): [] for t in range(len(trees)) for k in kinds}
        for kind, batch in kinds.items():
            for i, (op, a) in enumerate(batch):
                order = range(len(trees)) if i % 2 == 0 else reversed(range(len(trees)))
                for t in order:
                    t0 = time.perf_counter()
                    clients[t].call(op, **a)
                    times[(t, kind)].append(time.perf_counter() - t0)
        os.system("uptime")
        for (t, kind), values in times.items():
            print(f"{str(trees[t]):40s} {kind:17s} {summary(values)}")
    finally:
        for proc in daemons:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
        for tree, (tmp, config, netns) in zip(trees, setups):
            cleanup(tree, tmp, config, netns)


def wait_client(sock: str, proc, timeout: float = 900):
    from control.api import Client
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("a gateway daemon exited during start-up")
        try:
            c = Client(sock, timeout=600)
            c.call("status")
            return c
        except Exception:
            time.sleep(0.5)
    raise SystemExit("a gateway daemon did not start")


def main() -> None:
    if sys.argv[1:2] == ["_inner"]:
        inner(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the start")
    c = sub.add_parser("compare")
    c.add_argument("trees", nargs="+")
    for s in (p, c):
        s.add_argument("--scale", default="large", choices=("small", "medium", "large"))
        s.add_argument("--changes", type=int, default=50)
        s.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sys.path[:0] = [str(HERE), str(HERE / "scripts")]
    profile(args) if args.mode == "profile" else compare(args)


if __name__ == "__main__":
    main()
