"""The per-packet cost of rules by hostname, for scripts/bench: the small deployment's policy
with rules by name added, against the same policy with each of those rules written by
address instead (the /32s its names were learned for: what a name costs over the addresses
it stands for), timed in the same rounds, packet by packet, with BPF_PROG_TEST_RUN.

- a packet to a learned address (allowed by a rule by name; by address in the other), and
  packets that match no name (the deployment's own allowed, blocked and default packets,
  whose destinations were learned for no name), each against the same packet under the
  policy without hostnames;
- the packet to a learned address with 10 and with 10,000 addresses learned.

Every program is checked against the reference evaluator on every packet before it is timed.
"""
from __future__ import annotations

import ipaddress
import random
import statistics
from dataclasses import replace

import benchgen
from control.compiler import compile_policy
from control.model import TCP, Packet, Principal, Rule
from control.packets import build_raw
from control.probe import kernel_verdicts, reference_verdicts
from dataplane.program import Program

NAME_RULES = 20                                   # rules by name added to the policy
LEARNED_ADDR = ipaddress.IPv4Address("10.250.0.1")   # learned for svc0.corp.example
MANY_FROM = ipaddress.IPv4Address("10.251.0.0")      # the 10,000 other learned addresses


def name_rules(groups: list[str]) -> list[Rule]:
    """Half by exact name, half by wildcard; every other one for a group (a who condition),
    a quarter block rules; all ahead of the deployment's rules, so a packet that matches no
    name is tested against every one of them."""
    rules = []
    for i in range(NAME_RULES):
        name = f"svc{i}.corp.example" if i % 2 == 0 else f"*.db{i}.corp.example"
        rules.append(Rule(f"by-name-{i}", 1 + i, "block" if i % 4 == 3 else "allow",
                          principals=(Principal("group", groups[i % len(groups)]),) if i % 2 else (),
                          dst_hostnames=(name,), dst_ports=((443, 443),) if i % 3 == 0 else None))
    return rules


def learned(n: int) -> dict:
    """LEARNED_ADDR for svc0.corp.example, and n - 1 more addresses, each for a name of its own
    that a wildcard rule matches."""
    out = {LEARNED_ADDR: frozenset({"svc0.corp.example"})}
    for i in range(n - 1):
        out[MANY_FROM + i] = frozenset({f"h{i}.db{1 + 2 * (i % (NAME_RULES // 2))}.corp.example"})
    return out


def by_address(policy, names: dict):
    """POLICY with each rule's hostnames replaced by the /32s of the addresses learned for them."""
    from control.learned import Patterns

    rules = []
    for r in policy.rules:
        if r.dst_hostnames is not None:
            tokens = Patterns([r.dst_hostnames])
            nets = tuple(ipaddress.ip_network(a) for a, held in sorted(names.items()) if tokens.bits(held))
            r = replace(r, dst_hostnames=None, dst_cidrs=(r.dst_cidrs or ()) + nets)
        rules.append(r)
    return replace(policy, rules=tuple(rules))


def _load(policy, identities, names: dict, log, label: str) -> tuple:
    tables = compile_policy(policy, identities, None, names)
    program = Program(tables.need.with_headroom())
    program.load(tables)
    log(f"hostnames: {label}: loaded ({len(tables.learned)} learned addresses)")
    return program, tables


def _check(label: str, program, tables, policy, identities, pkts: list, names: dict) -> None:
    got = kernel_verdicts(program, tables, pkts, learned=names)
    want = reference_verdicts(policy, identities, pkts, names)
    wrong = [(p, w, g) for p, w, g in zip(pkts, want, got) if w != g]
    if wrong:
        raise SystemExit(f"bench: hostnames: {label}: the kernel disagrees with the reference on {len(wrong)} "
                         f"packets, e.g. {wrong[0]}; timings of a wrong program mean nothing")


def run(seed: int, repeat: int, rounds: int, log) -> dict:
    rng = random.Random(f"{seed}:hostnames")
    dep = benchgen.build("small", rng)
    named = replace(dep.policy, rules=tuple(name_rules(sorted(dep.members))) + dep.policy.rules)
    chosen = benchgen.choose_packets(dep, rng, 10)
    no_name = [pkt for cls in ("allowed", "blocked", "default") for pkt, _ in chosen[cls]]
    src = next(d for ds in dep.devices_of.values() for d in ds).tunnel_ipv4
    to_learned = Packet(src, LEARNED_ADDR, TCP, 40000, 443)
    pkts = [to_learned] + no_name

    few, many = learned(10), learned(10_000)
    plain = by_address(named, few)
    programs = {}
    for key, policy, names in (("plain", plain, few), ("few", named, few), ("many", named, many)):
        program, tables = _load(policy, dep.identities, names, log, key)
        _check(key, program, tables, policy, dep.identities, pkts, names)
        programs[key] = program
    assert reference_verdicts(named, dep.identities, [to_learned], few)[0].get("hostname") == "svc0.corp.example"

    raws = [build_raw(p) for p in pkts]
    samples = {(key, i): [] for key in programs for i in range(len(raws))}
    order = list(programs)
    try:
        with programs["plain"].on_one_cpu() as cpu:
            for n in range(rounds):
                for i, raw in enumerate(raws):
                    for key in order[n % 3:] + order[:n % 3]:      # each program takes each place in turn
                        samples[(key, i)].append(programs[key].run(raw, repeat, cpu).ns)
    finally:
        for program in programs.values():
            program.close()
    per_packet = {k: statistics.median(v) for k, v in samples.items()}
    ns = {key: {"learned": per_packet[(key, 0)],
                "no name": statistics.median(per_packet[(key, i)] for i in range(1, len(raws)))}
          for key in programs}
    return {"name_rules": NAME_RULES, "no_name_packets": len(no_name), "ns": ns,
            "ratio": {"learned / without hostnames": ns["few"]["learned"] / ns["plain"]["learned"],
                      "no name / without hostnames": ns["few"]["no name"] / ns["plain"]["no name"],
                      "learned, 10k / 10 learned": ns["many"]["learned"] / ns["few"]["learned"],
                      "no name, 10k / 10 learned": ns["many"]["no name"] / ns["few"]["no name"]}}


def rows(result: dict) -> list:
    ns = result["ns"]
    out = [("packet", f"{result['name_rules']} rules by address", "by name, 10 learned", "10k learned")]
    for kind in ("learned", "no name"):
        out.append((f"{kind} ns", f"{ns['plain'][kind]:.0f}", f"{ns['few'][kind]:.0f}", f"{ns['many'][kind]:.0f}"))
    return out
