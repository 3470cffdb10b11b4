"""The two probes of spec/POLICY.md: the reference's verdicts and the kernel's, same output."""
from __future__ import annotations

from typing import Optional

from dataplane.layout import Layout

from .compiler import Tables, compile_policy
from .learned import Patterns
from .model import Address, Identities, Policy
from .packets import Probe, Unreadable, parse_raw, probe_bytes
from .reference import decide


def reference_verdicts(policy: Policy, identities: Identities, probes: list[Probe],
                       learned: Optional[dict] = None) -> list[dict]:
    """LEARNED: address -> the names it was learned for (the `--dns` file), for the whole run."""
    return [decide(policy, identities, p, learned).as_json() for p in probes]


def name_of_token(names: Patterns, token: int, dst: Address, learned: Optional[dict]) -> Optional[str]:
    """The first (in order) of the names DST was learned for that name token TOKEN matches:
    how a rule the kernel says a learned name decided is told by its name (as the reference
    names it)."""
    return next((n for n in sorted((learned or {}).get(dst, ())) if names.tokens(n) >> token & 1), None)


def _dst(probe: Probe) -> Optional[Address]:
    if isinstance(probe, bytes):
        try:
            return parse_raw(probe).dst
        except Unreadable:
            return None
    return probe.dst


def kernel_verdicts(program, tables: Tables, probes: list[Probe], repeat: int = 0,
                    learned: Optional[dict] = None) -> list[dict]:
    """Run each probe through the loaded program (which holds `tables`) and read back the
    kernel's own verdict, rule and reason. A dry run unless REPEAT: the probe decides each
    packet alone, as the first of its flow, with no state from earlier packets (spec/POLICY.md)."""
    from .kernel import run_packets     # the kernel side only when asked (explain needs none)

    out = []
    for probe, r in zip(probes, run_packets(program, [probe_bytes(p) for p in probes], repeat)):
        line = {"verdict": r.verdict.label,
                "rule": tables.rule_names[r.rule - 1] if r.rule else None,
                "reason": r.reason.label}
        if r.name:
            line["hostname"] = name_of_token(tables.names, r.name, _dst(probe), learned)
        if repeat:
            line["ns"] = r.ns
        out.append(line)
    return out


def compile_and_run(policy: Policy, identities: Identities, probes: list[Probe], repeat: int = 0,
                    layout: Optional[Layout] = None, learned: Optional[dict] = None) -> list[dict]:
    """`ztgate dataplane verdicts`: compile, build the program for the tables, load, run."""
    from .kernel import loaded

    tables = compile_policy(policy, identities, layout, learned)
    with loaded(tables) as program:
        return kernel_verdicts(program, tables, probes, repeat, learned)
