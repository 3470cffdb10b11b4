"""What `policy apply` prints: the difference between the policy (and identities) in force
and the files, one line a change (+ added, - removed, ~ changed)."""
from __future__ import annotations

from ..files import rule_doc
from ..model import Identities, Policy


def policy_diff(old: Policy, new: Policy) -> list[str]:
    out = []
    if old.default_action != new.default_action:
        out.append(f"~ default_action {old.default_action} -> {new.default_action}")
    for g in sorted(set(old.groups) | set(new.groups)):
        a, b = old.groups.get(g), new.groups.get(g)
        if a != b:
            out.append(f"+ group {g}" if a is None else f"- group {g}" if b is None else
                       f"~ group {g}: members {sorted(a)} -> {sorted(b)}")
    before = {r.name: rule_doc(r) for r in old.rules}
    after = {r.name: rule_doc(r) for r in new.rules}
    for r in sorted(new.rules, key=lambda r: r.precedence):
        if r.name not in before:
            out.append(f"+ rule {r.name} (precedence {r.precedence}, {r.action})")
        elif before[r.name] != after[r.name]:
            keys = [k for k in dict.fromkeys(list(before[r.name]) + list(after[r.name]))
                    if before[r.name].get(k) != after[r.name].get(k)]
            out.append(f"~ rule {r.name}: " + "; ".join(
                f"{k} {before[r.name].get(k, '-')} -> {after[r.name].get(k, '-')}" for k in keys))
    out += [f"- rule {name}" for name in before if name not in after]
    return out


def identities_diff(old: Identities, new: Identities) -> list[str]:
    out = []
    ou, nu = {u.key: u for u in old.users}, {u.key: u for u in new.users}
    out += [f"+ user {nu[k].email}" for k in nu if k not in ou]
    out += [f"~ user {nu[k].email}: groups {sorted(ou[k].groups)} -> {sorted(nu[k].groups)}"
            for k in nu if k in ou and sorted(ou[k].groups) != sorted(nu[k].groups)]
    out += [f"- user {ou[k].email}" for k in ou if k not in nu]
    od, nd = {d.name: d for d in old.devices}, {d.name: d for d in new.devices}
    out += [f"+ device {k} ({nd[k].user}, {', '.join(map(str, nd[k].addresses))})" for k in nd if k not in od]
    out += [f"~ device {k}" for k in nd if k in od and nd[k] != od[k]]
    out += [f"- device {k}" for k in od if k not in nd]
    return out
