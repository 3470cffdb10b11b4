"""Rule changes without a compiler run: the part of control/kernel.py's Kernel that stages a
change of a few rules through control/incremental.py (the state of the build in force, kept
in self.inc), and makes that state after every whole build. A change it cannot take comes
back as None, and stage_swap() compiles everything, as the log says."""
from __future__ import annotations

import logging
from typing import Optional

from .incremental import Incremental, NotIncremental
from .model import Identities, Policy

log = logging.getLogger("ztgate.kernel")


class RuleChanges:
    """(A part of Kernel: needs build, standby, inc, _carry and _flip.)"""

    def _stage_change(self, identities: Identities, policy: Policy, number: int, forget: list) -> Optional["Staged"]:
        """The rules that changed, written into the bank not in force (None: the change needs
        a whole compile, said in the log)."""
        from .kernel import Build, Staged

        inc, program = self.inc, self.build.program
        self.inc = None            # until applied: a change staged and discarded leaves it stale
        self.inc_why = f"the change staged for build {number} was not applied"
        # the bank's counters are the build before's: carried by name, then zeroed where they counted
        counted = self._carry(self.standby)
        self.standby = None
        try:
            change = inc.stage(policy, identities, forget, counted)
        except NotIncremental as e:
            log.info("build %d: %s: the whole policy compiled (not only the rules that changed)", number, e)
            return None
        except Exception:   # a fault of this path must not stop the change: the whole compile takes it
            log.exception("build %d: the incremental change failed: the whole policy compiled", number)
            return None
        new = Build(number, program, change.tables, change.seconds, 0.0, 1 - program.bank, change.written)

        def apply() -> None:
            old_bank = program.bank
            self._flip(new)
            inc.applied(change, policy, old_bank)
            self.inc = inc
        return Staged(apply, lambda: None)

    def _begin_changes(self, build: "Build", policy: Policy, identities: Identities) -> None:
        """BUILD is in force after a whole compile: the state rule changes start from."""
        self.inc = None
        try:
            self.inc = Incremental(build.tables, policy, identities, build.program)
        except NotIncremental as e:
            self.inc_why = f"build {build.number} takes no incremental changes ({e})"
            log.info("build %d: rule changes will compile everything: %s", build.number, e)
