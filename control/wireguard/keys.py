"""WireGuard keys: X25519 pairs, base64 as WireGuard writes them (hex on wireguard-go's socket)."""
from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ..errors import InputError


KEY_HELP = "a WireGuard key is 44 characters of base64 encoding exactly 32 bytes (as `wg genkey | wg pubkey` prints)"


def generate_keypair() -> tuple[str, str]:
    """A new (private, public) X25519 key pair, both base64 as WireGuard writes them."""
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return b64(raw), public_key_of(b64(raw))


def public_key_of(private_b64: str) -> str:
    raw = decode_key(private_b64, "private key")
    key = X25519PrivateKey.from_private_bytes(raw)
    return b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


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
