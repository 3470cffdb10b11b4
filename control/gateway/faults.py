"""Fault injection: the one seam the fail-closed and crash tests use (tests/net/test_gateway.py).

Two environment variables, read at the moment the controller passes a stage:

ZTGATE_FAULT=STAGE fails the controller there with a KernelError:
  load          the whole build at start() (the gateway must fail closed)
  apply         every staged step of a change, after its commit (each step is discarded,
                then the data plane is rebuilt whole from the store)

ZTGATE_PAUSE_AT=STAGE stops the controller there (saying "ztgate: paused at STAGE" on stderr)
until it is killed:
  before-commit a change's store writes and staged steps are made, not yet committed
  after-commit  the change is committed, none of its steps applied
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from ..errors import KernelError
from ..kernel import Staged


def fault(stage: str, step: Optional[Staged] = None) -> None:
    if os.environ.get("ZTGATE_FAULT") == stage:
        if step is not None:
            step.discard()
        raise KernelError(f"injected fault at {stage} (ZTGATE_FAULT)")


def pause(stage: str) -> None:
    if os.environ.get("ZTGATE_PAUSE_AT") == stage:
        print(f"ztgate: paused at {stage}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
