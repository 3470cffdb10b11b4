"""Where a long request's time goes, stage by stage, for one line of the log: `policy apply`
of a large deployment takes seconds, and an operator (or the bench) should see in which
part without a profiler."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from .kernel import Staged


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.parts: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """The time spent inside, added to NAME's."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - started

    def step(self, name: str, stage: Callable[[int], Staged]) -> Callable[[int], Staged]:
        """A Plan's step, its staging and its applying timed as 'NAME staged', 'NAME applied'."""
        def timed(generation: int) -> Staged:
            with self.stage(f"{name} staged"):
                staged = stage(generation)

            def apply() -> None:
                with self.stage(f"{name} applied"):
                    staged.apply()
            return Staged(apply, staged.discard)
        return timed

    def __str__(self) -> str:
        total = time.perf_counter() - self.started
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.parts.items())
        return f"{total:.2f} s ({parts}; the rest {total - sum(self.parts.values()):.2f} s)"
