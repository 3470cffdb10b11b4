"""What the identity provider may not do to the gateway's users, beside what a token proves
(sessions.py asks; each answer is None, or the (HTTP status, why) of a refusal):

- a token issued too early logs nobody in (floors.py);
- a user enrolls at most identity.max_devices devices through the IdP;
- SCIM does not take over a user the operators made by hand.
"""
from __future__ import annotations

from typing import Optional

from ..model import Identities, User
from . import floors


def too_early(db, user: User, device: Optional[str], issued_at: Optional[float]) -> Optional[tuple[int, str]]:
    """USER (with the token's issuer and subject) logging in with a token issued at ISSUED_AT,
    renewing DEVICE (None: enrolling a new one)."""
    return floors.too_early(db, issuer=user.issuer, subject=user.subject, email=user.key, device=device,
                            issued_at=issued_at)


def over_cap(ids: Identities, user: User, cap: Optional[int]) -> Optional[tuple[int, str]]:
    """One more device for USER would be over CAP (counting all of its devices, hand-made ones too)."""
    mine = [d.name for d in ids.devices if d.user == user.key]
    if cap is None or len(mine) < cap:
        return None
    return 403, (f"{user.email} has {len(mine)} devices ({', '.join(mine)}), as many as identity.max_devices "
                 f"allows ({cap}): renew one of them, or ask an operator to remove one (`ztgate device remove NAME`)")


def hand_made(ids: Identities, user: Optional[User]) -> Optional[tuple[int, str]]:
    """SCIM binds a user of the gateway only if the IdP made it (a login, or SCIM): a user an
    operator made (even one that has logged in since), or one with devices enrolled by hand, stays
    the operators', so that SCIM cannot deactivate or delete it and its devices."""
    if user is None:
        return None
    hand_devices = [d.name for d in ids.devices if d.user == user.key and d.session_expires is None]
    if user.by_hand or user.issuer is None or hand_devices:
        what = f"has devices enrolled by hand ({', '.join(hand_devices)})" if hand_devices else "was made by hand"
        return 409, (f"user {user.email!r} {what}: SCIM does not take it over; an operator may remove it "
                     "(`ztgate user remove --with-devices`) to let the identity provider provision it")
    return None
