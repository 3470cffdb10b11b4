"""Where the CLI finds the running gateway: apart from control/config.py, whose YAML and
config parsing a verb that only talks to the socket does not need at start-up."""
from __future__ import annotations

import os

DEFAULT_SOCKET = "/run/ztgate/ztgate.sock"


def socket_path() -> str:
    """Where every CLI verb finds the running gateway (ZTGATE_SOCKET overrides)."""
    return os.environ.get("ZTGATE_SOCKET", DEFAULT_SOCKET)
