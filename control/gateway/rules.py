"""Policy and rules: `policy apply` (the whole policy, and identities with it) and the rule
verbs (add, remove, enable, disable, move). Every rule change is a whole new build."""
from __future__ import annotations

import gc
import logging
from dataclasses import replace
from typing import Any, Optional

from ..errors import InputError
from ..files import check_rules, parse_identities, parse_policy, parse_rule, rule_doc
from ..gcpause import collections_paused
from ..model import Identities, Rule
from ..stopwatch import Stopwatch
from ..yamlfile import parse_yaml
from . import steps
from .core import Core, Plan
from .diff import identities_diff, policy_diff
from .sessions import kept_from_provider

log = logging.getLogger("ztgate.gateway")


class RuleOps(Core):
    def policy_apply(self, uid: int, policy_text: str, policy_name: str, identities_text: Optional[str],
                     identities_name: Optional[str], dry_run: bool) -> dict:
        # Millions of objects are made and kept (the files' documents, the new deployment, its
        # tables): no cyclic collection walks them (nor the deployment in force) meanwhile.
        with collections_paused():
            watch = Stopwatch()
            out = self._policy_apply(uid, watch, policy_text, policy_name, identities_text, identities_name, dry_run)
            if out["applied"]:
                # One full collection now, in this request: the objects made meanwhile move to the
                # oldest generation, and the collector's count starts again from there. Left for
                # later, the same walks would fall on the next changes (a rule add would wait ~1 s).
                with watch.stage("collect"):
                    gc.collect()
            log.info("policy apply: %s", watch)
            return out

    def _policy_apply(self, uid: int, watch: Stopwatch, policy_text: str, policy_name: str,
                      identities_text: Optional[str], identities_name: Optional[str], dry_run: bool) -> dict:
        with watch.stage("policy read"):
            policy = parse_policy(parse_yaml(policy_text, policy_name), policy_name)
        identities = None
        if identities_text is not None:
            with watch.stage("identities read"):
                identities = parse_identities(parse_yaml(identities_text, identities_name), identities_name)
                self._check_not_the_gateways(identities, identities_name)
        with self.lock:
            with watch.stage("diff"):
                if identities is not None:
                    identities = kept_from_provider(self.identities, identities)
                changes = policy_diff(self.policy, policy)
                if identities is not None:
                    changes += identities_diff(self.identities, identities)
            if dry_run or not changes:
                return {"changes": changes, "applied": False, "generation": self.store.generation()}
            new_ids = identities if identities is not None else self.identities

            def write(tx) -> None:
                with watch.stage("store"):
                    tx.replace_policy(policy)
                    if identities is not None:
                        tx.replace_identities(identities)
            # Addresses that change hands: their flows are forgotten with the swap (a reply on
            # an old tuple must not be decided again as the new owner's). WireGuard stops taking
            # them from their old peers before the kernel gives them to new owners, and gives
            # them to the new peers after: a step that fails between leaves an address admitted
            # by no peer, never by a peer the kernel takes for someone else.
            old_ids = self.identities
            moved = moved_addresses(old_ids, new_ids)
            kernel_step = [watch.step("kernel", lambda gen: self.kernel.stage_swap(new_ids, policy, gen, forget=moved))]
            peer_steps = [watch.step("peers", lambda gen: steps.kept_peers_step(self.config, old_ids, new_ids)),
                          *kernel_step, watch.step("peers", lambda gen: steps.all_peers_step(self.config, new_ids))]
            plan = Plan("policy apply", {"policy": policy_name, "identities": identities_name,
                                         "changes": len(changes)},
                        replace(self.state, identities=new_ids, policy=policy), write,
                        peer_steps if identities is not None else kernel_step,
                        owners={d.name: d.user for d in new_ids.devices})
            out = self._commit(uid, plan)
            with watch.stage("lookups"):
                self._warm_lookups()
            return {"changes": changes, "applied": True, "generation": out["generation"]}

    def _check_not_the_gateways(self, identities: Identities, source: str) -> None:
        """Tunnel addresses and keys must not be the gateway's own."""
        own = {a.ip for a in self.config.gateway_addresses}
        for d in identities.devices:
            if d.public_key is not None and d.public_key == self.public_key:
                raise InputError(f"{source}: device {d.name!r}: public_key is the gateway's own key")
            for a in d.addresses:
                if a in own:
                    raise InputError(f"{source}: device {d.name!r}: {a} is the gateway's own tunnel address")

    # -----------------------------------------------------------------------------------------

    def _rules_changed(self, uid: int, what: str, detail: dict, rules: list[Rule]) -> dict:
        """The policy with this rule list (each rule valid on its own; checked as a list),
        swapped in as a whole new build."""
        check_rules(rules, "request")
        policy = replace(self.policy, rules=tuple(rules))
        stored = self.policy
        return self._commit(uid, Plan(what, detail, replace(self.state, policy=policy),
                                      lambda tx: tx.replace_rules(stored, policy),   # only the rules that changed
                                      [lambda gen: self.kernel.stage_swap(self.identities, policy, gen)]))

    def _rule(self, name: Any) -> Rule:
        for r in self.policy.rules:
            if r.name == name:
                return r
        raise InputError(f"no rule named {name!r} (see `ztgate rule list`)")

    def rule_add(self, uid: int, rule: dict) -> dict:
        with self.lock:
            if isinstance(rule, dict) and rule.get("precedence") is None:
                last = max((r.precedence for r in self.policy.rules), default=0)
                rule = dict(rule, precedence=(last // 10 + 1) * 10)
            new = parse_rule(rule, "rule")
            for r in self.policy.rules:
                if r.name == new.name:
                    raise InputError(f"rule {new.name!r} exists already (remove it first, or pick another name)")
                if r.precedence == new.precedence:
                    raise InputError(f"rule {new.name!r}: precedence {new.precedence} is taken by rule {r.name!r}")
            out = self._rules_changed(uid, "rule add", rule_doc(new), list(self.policy.rules) + [new])
            return dict(out, rule=rule_doc(new))

    def rule_remove(self, uid: int, name: str) -> dict:
        with self.lock:
            self._rule(name)
            return self._rules_changed(uid, "rule remove", {"name": name},
                                       [r for r in self.policy.rules if r.name != name])

    def rule_set_enabled(self, uid: int, name: str, enabled: bool) -> dict:
        with self.lock:
            if self._rule(name).enabled == enabled:
                return {"generation": self.store.generation(), "unchanged": True}
            return self._rules_changed(uid, "rule enable" if enabled else "rule disable", {"name": name},
                                       [replace(r, enabled=enabled) if r.name == name else r for r in self.policy.rules])

    def rule_move(self, uid: int, name: str, precedence: Optional[int], before: Optional[str],
                  after: Optional[str]) -> dict:
        with self.lock:
            rule = self._rule(name)
            if sum(x is not None for x in (precedence, before, after)) != 1:
                raise InputError("rule move: give exactly one of precedence, before or after")
            others = sorted((r for r in self.policy.rules if r.name != name), key=lambda r: r.precedence)
            if precedence is not None:
                rules = _moved_to(rule, others, precedence)
            else:
                rules = _moved_beside(rule, others, before, after)
            return self._rules_changed(uid, "rule move", {"name": name, "precedence": precedence,
                                                          "before": before, "after": after}, rules)


def _moved_to(rule: Rule, others: list[Rule], precedence: int) -> list[Rule]:
    if precedence < 1:
        raise InputError(f"rule move: precedence must be 1 or more, got {precedence}")
    clash = [r.name for r in others if r.precedence == precedence]
    if clash:
        raise InputError(f"rule move: precedence {precedence} is taken by rule {clash[0]!r}")
    return others + [replace(rule, precedence=precedence)]


def _moved_beside(rule: Rule, others: list[Rule], before: Optional[str], after: Optional[str]) -> list[Rule]:
    anchor = before if before is not None else after
    names = [r.name for r in others]
    if anchor not in names:
        raise InputError(f"rule move: no other rule named {anchor!r}")
    at = names.index(anchor) + (1 if after is not None else 0)
    order = others[:at] + [rule] + others[at:]
    lo = order[at - 1].precedence if at > 0 else 0
    hi = order[at + 1].precedence if at + 1 < len(order) else lo + 20
    if hi - lo >= 2:
        return others + [replace(rule, precedence=(lo + hi) // 2)]
    return [replace(r, precedence=10 * (i + 1)) for i, r in enumerate(order)]   # no room: renumber by tens


def moved_addresses(old: Identities, new: Identities) -> list:
    """Tunnel addresses whose device (name, owner or key) is not the same, or not enabled, in NEW."""
    def owners(ids: Identities) -> dict:
        return {a: (d.name, d.user, d.public_key) for d in ids.devices if d.enabled for a in d.addresses}
    after = owners(new)
    return [a for a, who in owners(old).items() if after.get(a) != who]
