"""WireGuard keys as text: base64 of 32 bytes, spelled as WireGuard spells them. Only the
checks and conversions that need no cryptography and no interface, so that reading a policy
or identities file (control/files.py) does not load the WireGuard package."""
from __future__ import annotations

import base64

from .errors import InputError

KEY_HELP = "a WireGuard key is 44 characters of base64 encoding exactly 32 bytes (as `wg genkey | wg pubkey` prints)"


def check_public_key(s: str) -> str:
    """The key itself if it is well formed and spelled as WireGuard spells it, else InputError
    saying what a key looks like. Base64 leaves two unused bits in a 32-byte key's last
    character, so four spellings decode to one key: only the one WireGuard writes is taken, so
    that a key compared as text (held by another device?) is the key itself."""
    raw = decode_key(s, "public key")
    if b64(raw) != s:
        raise InputError(f"WireGuard public key {s!r} is not spelled as WireGuard spells it: "
                         f"write {b64(raw)!r} (the same key)")
    return s


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_key(s, what: str) -> bytes:
    if not isinstance(s, str):
        raise InputError(f"WireGuard {what} must be a string: {KEY_HELP}")
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise InputError(f"not a valid WireGuard {what} {s!r}: {KEY_HELP}") from None
    if len(raw) != 32:
        raise InputError(f"not a valid WireGuard {what} {s!r} ({len(raw)} bytes): {KEY_HELP}")
    return raw


def key_hex(key_b64: str, what: str = "public key") -> str:
    return decode_key(key_b64, what).hex()


def from_hex(key_hex: str) -> str:
    return b64(bytes.fromhex(key_hex))
