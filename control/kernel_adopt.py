"""A restarted controller's first build, written into the program the gateway pinned before
instead of a new compile (dataplane/pinned.py says when it may be adopted): the tables go into
its bank not in force and one store flips it, as any change in place. A part of Kernel kept
apart for its size: it uses Kernel's config, builds, lock and steps (control/kernel.py)."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

from dataplane.attach import attach
from dataplane.errors import KernelError
from dataplane.pinned import adopt

if TYPE_CHECKING:
    from .compiler import Tables
    from .kernel import Build, Staged

log = logging.getLogger("ztgate.kernel")


class Adoption:

    def _stage_adopted(self, tables: Tables, number: int, forget: list, compile_seconds: float,
                       basis: tuple) -> Optional[Staged]:
        """TABLES staged in the pinned program's bank not in force; None when it may not be
        adopted (the log says why, and the caller builds a new program). BASIS: the policy and
        identities compiled, which rule changes start from once it is in force."""
        from .kernel import Build, Staged

        started = time.perf_counter()
        program, why = adopt(self.config.bpf_pin_dir, tables.need)
        if program is None:
            log.info("build %d: the pinned program is not adopted: %s; compiling one", number, why)
            return None
        try:
            written = program.stage(tables)
        except BaseException:
            program.close()
            raise
        new = Build(number, program, tables, compile_seconds, time.perf_counter() - started, 1 - program.bank, written)

        def apply() -> None:
            self._take_over(new, forget)
            self._begin_changes(new, *basis)
        return Staged(apply, program.close)

    def _take_over(self, new: Build, forget: list = ()) -> None:
        """Put NEW's bank in force (one store), and the adopted program on the interfaces
        (again: it is there unless someone took it off), as _switch does with a new program."""
        program = new.program
        with self.learned_lock:
            self._catch_up_learned(new)
            program.flip(new.number)
            try:
                attach(program, self.config.interface, self.config.xdp_mode)
            except BaseException:
                program.close()
                raise
            self.build, self.standby = new, None     # (the other bank's counters are the last controller's)
        self._remember(new)
        failed = self._attach_reply_sides(program, "has no connector-side program")
        if forget:
            program.forget_flows(forget)
        self._next_epoch(program)
        try:
            program.pin(self.config.bpf_pin_dir)
        except (KernelError, OSError) as e:
            log.error("build %d is in force but not pinned again: %s", new.number, e)
            failed.append(f"pin: {e}")
        log.info("build %d adopted the pinned program %d (bank %d, no compile): compile %.3f s, "
                 "%d entries written in %.3f s", new.number, program.id, new.bank, new.compile_seconds,
                 new.written, new.load_seconds)
        if failed:
            raise KernelError(f"build {new.number} is in force on {self.config.interface}, but: {'; '.join(failed)}")
