"""`ztgate dataplane attach IFACE` and `detach IFACE`: the engine alone on any interface, no
daemon (spec/CLI.md). The files are read and checked as `policy apply` checks them (same
messages, exit status 2), compiled for the interface's frames (Ethernet or from the IP header,
by its link type), and handed to dataplane/standalone.py, which builds, fills, attaches in one
step and pins. Every refusal comes before anything changes."""
from __future__ import annotations

import json
import os
from dataclasses import replace

from ..errors import InputError, ZtError
from ..files import load_identities, load_policy
from ..model import Identities, Policy

MODES = ("auto", "native", "generic")


def attach_policy(ifname: str, policy: Policy, identities: Identities, mode: str = "auto") -> dict:
    """Compile POLICY and IDENTITIES for IFNAME (in this thread's network namespace) and make
    them the engine there: what `dataplane attach` does after reading its files (the bench's
    real-traffic leg calls it too). Returns what it did, as `--json` prints it."""
    from dataplane import standalone

    from ..compiler import choose_pools, compile_policy

    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: use native or generic (or auto: native where the driver has it)")
    ethernet = standalone.link_is_ethernet(ifname)
    tables = compile_policy(policy, identities, replace(choose_pools(identities), ethernet=ethernet))
    if os.geteuid() != 0:
        raise ZtError("dataplane attach loads a BPF program and attaches it: run it as root")
    done = standalone.install(tables, ifname, mode)
    return {"interface": ifname, "mode": done.mode, "frames": "ethernet" if ethernet else "ip",
            "program": done.prog_id, "replaced": done.replaced, "pins": str(done.pins),
            "rules": len(tables.rule_names), "devices": sum(d.enabled for d in identities.devices),
            "build_seconds": round(done.build_seconds, 3)}


def cmd_dataplane_attach(args) -> int:
    policy, identities = load_policy(args.policy), load_identities(args.identities)
    out = attach_policy(args.iface, policy, identities, args.mode)
    if args.json:
        print(json.dumps(out))
        return 0
    frames = "Ethernet frames" if out["frames"] == "ethernet" else "frames from the IP header"
    what = f"replaced program {out['replaced']} on" if out["replaced"] else "attached to"
    print(f"ztgate engine {what} {out['interface']} ({out['mode']} XDP, {frames}): {out['rules']} rules, "
          f"{out['devices']} devices; program {out['program']}, pinned at {out['pins']}")
    return 0


def cmd_dataplane_detach(args) -> int:
    from dataplane import standalone

    if os.geteuid() != 0:
        raise ZtError("dataplane detach changes an interface's XDP program: run it as root")
    gone = standalone.remove(args.iface)
    if args.json:
        print(json.dumps({"interface": args.iface, "detached": gone}))
    elif gone is None:
        print(f"no engine was attached to {args.iface}; its pins (if any) are removed")
    else:
        print(f"detached program {gone} from {args.iface}; its pins are removed")
    return 0
