"""`ztgate login`: a device logs in through the gateway's identity provider and enrolls
(control/identity/device.py does the work; this prints and brings the tunnel up)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..errors import ZtError
from .output import print_json


def cmd_login(args) -> int:
    from ..identity.device import Login, default_name

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
    login = Login(args.gateway, args.ca, say)
    name = args.name or default_name()
    config = Path(args.config)
    answer = login.enroll(login.id_token(args.flow), name, config)
    if args.json:
        print_json({k: answer[k] for k in ("device", "user", "addresses", "session_expires", "renewed")})
    else:
        print(f"device {answer['device']} of {answer['user']} {'renewed' if answer['renewed'] else 'enrolled'}, "
              f"addresses {', '.join(answer['addresses'])}; configuration in {config} (mode 0600)")
    if args.up:
        up = subprocess.run(["wg-quick", "up", str(config)], capture_output=True, text=True)
        if up.returncode != 0 and "already exists" not in up.stderr:
            raise ZtError(f"wg-quick up {config}: {up.stderr.strip() or up.returncode}")
    return 0
