"""The two probes of spec/POLICY.md: the reference's verdicts and the kernel's, same output."""
from __future__ import annotations

from typing import Optional

from dataplane.layout import Layout

from .compiler import Tables, compile_policy
from .model import Identities, Policy
from .packets import Probe, probe_bytes
from .reference import decide


def reference_verdicts(policy: Policy, identities: Identities, probes: list[Probe]) -> list[dict]:
    return [decide(policy, identities, p).as_json() for p in probes]


def kernel_verdicts(program, tables: Tables, probes: list[Probe], repeat: int = 0) -> list[dict]:
    """Run each probe through the loaded program (which holds `tables`) and read back the
    kernel's own verdict, rule and reason. A dry run unless REPEAT: the probe decides each
    packet alone, as the first of its flow, with no state from earlier packets (spec/POLICY.md)."""
    from .kernel import run_packets     # the kernel side only when asked (explain needs none)

    out = []
    for r in run_packets(program, [probe_bytes(p) for p in probes], repeat):
        line = {"verdict": r.verdict.label,
                "rule": tables.rule_names[r.rule - 1] if r.rule else None,
                "reason": r.reason.label}
        if repeat:
            line["ns"] = r.ns
        out.append(line)
    return out


def compile_and_run(policy: Policy, identities: Identities, probes: list[Probe], repeat: int = 0,
                    layout: Optional[Layout] = None) -> list[dict]:
    """`ztgate dataplane verdicts`: compile, build the program for the tables, load, run."""
    from .kernel import loaded

    tables = compile_policy(policy, identities, layout)
    with loaded(tables) as program:
        return kernel_verdicts(program, tables, probes, repeat)
