#!/usr/bin/env python3
"""`policy apply` of a bench deployment with identities through a real daemon, in stages.

A narrow harness for the apply path (scripts/bench times only the whole request): the
deployment's files are written once into --files (kept: generating the large one takes
~20 s), a gateway daemon is started in a throwaway namespace as scripts/benchchanges.py
starts it, and the request is timed from the client's side; the daemon's own stage line
("policy apply: ...", control/gateway/rules.py) is printed beside it. With --py-spy FILE the
daemon is sampled during the request without stopping it (a stopped process aborts the BPF
verifier with EAGAIN) into FILE, in py-spy's raw format, and its busiest functions printed.

With --tree DIR the daemon runs the code of another checkout (main's, say: `git worktree add`
or `git archive main | tar -x -C DIR`) with this one's venv, for a before and after in one run;
--stages also times the controller's stages in-process (scripts/benchapply_stages.py: YAML,
checks, diff, store write; CPU seconds) with each tree's code.

examples (the large deployment needs GBs: run it under the large lock):
  flock /tmp/ztgate-large.lock scripts/benchapply.py --scale large
  flock /tmp/ztgate-large.lock scripts/benchapply.py --scale large --tree /tmp/main-tree --stages
  scripts/benchapply.py --scale small --repeat 3
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
if Path(sys.prefix).resolve() != VENV.resolve():
    python = VENV / "bin" / "python"
    os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import yaml  # noqa: E402

import benchgen  # noqa: E402
from benchchanges import PYTHON, _wait_socket  # noqa: E402
from benchgateway import gateway_files, stop_gateway  # noqa: E402
from control.api import Client  # noqa: E402
from control.files import identities_doc, policy_doc  # noqa: E402


def deployment_files(scale: str, seed: int, where: Path) -> tuple[Path, Path]:
    """The deployment's policy.yaml and identities.yaml, as scripts/benchchanges.py writes them."""
    where = where / f"{scale}-{seed}"
    policy, identities = where / "policy.yaml", where / "identities.yaml"
    if not identities.exists():
        where.mkdir(parents=True, exist_ok=True)
        dep = benchgen.build(scale, random.Random(f"{seed}:{scale}"))
        policy.write_text(yaml.safe_dump(policy_doc(dep.policy), sort_keys=False))
        identities.write_text(yaml.safe_dump(identities_doc(dep.identities), sort_keys=False))
    return policy, identities


def top(raw: Path, n: int = 25) -> None:
    """py-spy's raw output (one line: frames;...;frames COUNT): the functions with the most
    samples, by self and by total."""
    own, total, samples = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, count = stack.split(";"), int(count)
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    print(f"py-spy: {samples} samples")
    for label, counter in (("self", own), ("total", total)):
        print(f"  by {label}:")
        for f, c in counter.most_common(n):
            print(f"    {100 * c / samples:5.1f} %  {f}")


def stages(tree: Path, policy: Path, identities: Path) -> None:
    """The controller's stages in-process, with TREE's code."""
    got = subprocess.run([PYTHON, str(REPO / "scripts" / "benchapply_stages.py"), str(policy), str(identities)],
                         cwd=tree, capture_output=True, text=True)
    print(f"stages with {tree} (CPU s): {got.stdout.strip() or got.stderr.strip()[-500:]}", flush=True)


def run(args, tree: Path) -> None:
    policy, identities = deployment_files(args.scale, args.seed, Path(args.files))
    print(f"== daemon from {tree}", flush=True)
    if args.stages:
        stages(tree, policy, identities)
    netns, tmp, pin_dir, sock, config = gateway_files("bench")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    daemon = spy = None
    try:
        daemon = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "control.cli", "gateway",
                                   "run", "--config", str(config)], cwd=tree, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp / "daemon.log", "w"))
        _wait_socket(sock, daemon, 120)
        pid = daemon.pid      # nsenter execs the daemon: same process
        with Client(sock, timeout=900) as c:
            for i in range(args.repeat):
                if args.py_spy and i == 0:
                    spy = subprocess.Popen(["py-spy" if shutil.which("py-spy") else str(VENV / "bin" / "py-spy"),
                                            "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
                                            "--output", args.py_spy, "--threads", "--nonblocking"] + (["--idle"] if args.idle else []),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                started = time.perf_counter()
                texts = {"policy": policy.read_text(), "identities": identities.read_text()}
                read = time.perf_counter()
                out = c.call("policy.apply", policy_text=texts["policy"], policy_name="policy.yaml",
                             identities_text=texts["identities"], identities_name="identities.yaml")
                done = time.perf_counter()
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(timeout=120)
                    spy = None
                print(f"apply #{i}: {done - started:.2f} s (files read {read - started:.2f} s, request "
                      f"{done - read:.2f} s), {len(out['changes'])} changes, generation {out['generation']}",
                      flush=True)
                if i + 1 < args.repeat:     # the next apply changes something: both files again, one rule moved
                    policy = _one_rule_moved(policy, tmp / f"policy-{i}.yaml")
        for line in (tmp / "daemon.log").read_text().splitlines():
            if any(w in line for w in ("policy apply:", "attached to", "in place of", "compiled", "rule changes")):
                print("  daemon:", line.split(" ", 2)[-1][:300])
        if args.py_spy:
            top(Path(args.py_spy))
    finally:
        if spy is not None:
            spy.kill()
        stop_gateway(daemon, netns, config, pin_dir, tmp, wait=60)


def _one_rule_moved(policy: Path, out: Path) -> Path:
    doc = yaml.load(policy.read_text(), Loader=yaml.CSafeLoader)
    doc["rules"][0]["precedence"] = max(r["precedence"] for r in doc["rules"]) + 1
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(benchgen.SIZES), default="large")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--files", default="/tmp/ztgate-benchapply", help="where the deployment's files are kept")
    ap.add_argument("--repeat", type=int, default=1, help="applies in a row (each after the first moves a rule)")
    ap.add_argument("--py-spy", help="sample the daemon during the first apply into this file (raw format)")
    ap.add_argument("--idle", action="store_true", help="with --py-spy: idle threads' samples too")
    ap.add_argument("--tree", help="also run the daemon from this checkout (first), for a before and after")
    ap.add_argument("--stages", action="store_true", help="the controller's stages in-process too, per tree")
    args = ap.parse_args()
    for tree in ([Path(args.tree).resolve()] if args.tree else []) + [REPO]:
        run(args, tree)


if __name__ == "__main__":
    main()
