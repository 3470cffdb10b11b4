"""The session verbs (spec/IDENTITY.md, "Sessions"): `device expire`, `user expire`, and how
`device list` says a session's end."""
from __future__ import annotations

import time
from typing import Optional

from .output import call, done


def cmd_device_expire(args) -> int:
    result = call(args, "device.expire", name=args.name)
    return done(args, result, f"device {args.name}'s session ended")


def cmd_user_expire(args) -> int:
    result = call(args, "user.expire", email=args.email)
    ended = result.get("ended") or []
    return done(args, result, f"{args.email}: sessions ended" + (f" ({', '.join(ended)})" if ended else ""))


def session_column(expires: Optional[float]) -> str:
    """A device's session as `device list` prints it: none (enrolled by hand), when it ends,
    or how long ago it ended."""
    if expires is None:
        return "-"
    left = expires - time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
    if left <= 0:
        return f"expired {stamp}"
    return f"until {stamp} ({_span(left)})"


def _span(seconds: float) -> str:
    s = int(seconds)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"
