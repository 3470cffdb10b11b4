"""The verbs that read files and need no gateway: explain (the reference), dataplane verdicts
(the kernel through BPF_PROG_TEST_RUN), policy check."""
from __future__ import annotations

import ipaddress
import json
import os

from ..errors import InputError, ZtError
from ..files import load_identities, load_policy
from ..model import Packet, fold
from ..packets import load_probes, packet_from_fields
from ..protocols import PORTED


def _load(args):
    return load_policy(args.policy), load_identities(args.identities)


def _learned(args):
    """The `--dns LEARNED.jsonl` file: address -> names (spec/POLICY.md, Hostnames); {} without."""
    from ..learned import load_learned

    return load_learned(args.dns) if getattr(args, "dns", None) else {}


def _print_jsonl(rows) -> None:
    for row in rows:
        print(json.dumps(row))


def cmd_explain(args) -> int:
    from ..probe import reference_verdicts

    policy, identities = _load(args)
    single = any(v is not None for v in (args.user, args.src, args.dst))
    if args.packets and single:
        raise InputError("explain: give either --packets FILE or one packet by flags, not both")
    if args.packets:
        _print_jsonl(reference_verdicts(policy, identities, load_probes(args.packets), _learned(args)))
        return 0
    if not single:
        raise InputError("explain: give --packets FILE, or a packet: --user EMAIL or --src ADDR, and --dst ADDR")
    pkt = _packet_from_flags(args, identities)
    _explain_one(policy, identities, pkt, args.json, _learned(args))
    return 0


def _packet_from_flags(args, identities) -> Packet:
    if args.dst is None or (args.user is None and args.src is None):
        raise InputError("explain: a packet needs --dst and one of --user or --src")
    try:
        dst = ipaddress.ip_address(args.dst)
    except ValueError:
        raise InputError(f"explain: --dst {args.dst!r} is not an IP address") from None
    src = args.src
    if args.user is not None:
        email = fold(args.user)
        devices = [d for d in identities.devices if d.user == email and d.enabled]
        if not devices:
            raise InputError(f"explain: --user {args.user}: no enabled device of this user in {args.identities}")
        addrs = [a for d in devices for a in d.addresses if a.version == dst.version]
        if not addrs:
            raise InputError(f"explain: --user {args.user}: no IPv{dst.version} tunnel address to send from")
        src = str(addrs[0])
    fields = {"src": src, "dst": args.dst, "proto": args.proto}
    for key in ("sport", "dport"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    return packet_from_fields(fields, "explain")


def _explain_one(policy, identities, pkt: Packet, as_json: bool, learned: dict) -> None:
    from ..reference import identify, trace

    decision, misses = trace(policy, identities, pkt, learned)
    who = identify(policy, identities, pkt.src)
    if as_json:
        out = decision.as_json()
        out["tried"] = [{"rule": r.name, "precedence": r.precedence, "why_not": why} for r, why in misses]
        if who:
            out["device"], out["user"], out["groups"] = who.device.name, who.email, sorted(who.groups)
        print(json.dumps(out))
        return
    ports = pkt.proto in PORTED
    sep = lambda a, port: f"[{a}]:{port}" if a.version == 6 and ports else (f"{a}:{port}" if ports else str(a))
    print(f"packet   {pkt.protocol_name if pkt.protocol_name != 'other' else f'proto {pkt.proto}'} "
          f"{sep(pkt.src, pkt.sport)} -> {sep(pkt.dst, pkt.dport)}")
    if who is None:
        print(f"identity none: {pkt.src} is not the tunnel address of an enabled device")
    else:
        print(f"identity device {who.device.name}, user {who.email}, groups {', '.join(sorted(who.groups)) or '-'}")
    if learned.get(pkt.dst):
        print(f"learned  {pkt.dst} for {', '.join(sorted(learned[pkt.dst]))} (the --dns file: for the whole run)")
    if decision.rule and decision.hostname:
        print(f"verdict  {decision.verdict.upper()} by rule {decision.rule}, "
              f"as {pkt.dst} was learned for {decision.hostname}")
    elif decision.rule:
        print(f"verdict  {decision.verdict.upper()} by rule {decision.rule}")
    elif decision.reason == "default":
        print(f"verdict  {decision.verdict.upper()} by default_action (no rule matched)")
    else:
        print(f"verdict  {decision.verdict.upper()} ({decision.reason}); no rule is consulted")
    if misses:
        print("rules tried before it, and why each did not match:")
        width = max(len(r.name) for r, _ in misses)
        for r, why in misses:
            print(f"  {r.precedence:>6}  {r.name:<{width}}  {r.action:<5}  {why}")


def cmd_verdicts(args) -> int:
    from dataclasses import replace

    from ..compiler import choose_pools
    from ..probe import compile_and_run

    policy, identities = _load(args)
    probes = load_probes(args.packets)
    if args.repeat < 0:
        raise InputError("--repeat must be 0 or more")
    if os.geteuid() != 0:
        raise ZtError("dataplane verdicts loads a BPF program: run it as root")
    layout = replace(choose_pools(identities), ethernet=args.ethernet)
    _print_jsonl(compile_and_run(policy, identities, probes, args.repeat, layout, _learned(args)))
    return 0


def cmd_check(args) -> int:
    import time

    from ..compiler import compile_policy

    policy, identities = _load(args)
    started = time.perf_counter()
    tables = compile_policy(policy, identities)
    stats = dict(tables.stats, compile_seconds=round(time.perf_counter() - started, 3),
                 devices=len(identities.devices), users=len(identities.users), rules_in_file=len(policy.rules))
    if args.json:
        print(json.dumps(stats))
    else:
        print("policy and identities are valid")
        width = max(map(len, stats))
        for k, v in stats.items():
            print(f"  {k:<{width}}  {v}")
    return 0
