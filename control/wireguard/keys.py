"""WireGuard keys: X25519 pairs, base64 as WireGuard writes them (hex on wireguard-go's socket)."""
from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

# the text side (checks, base64, hex) needs no cryptography: it lives beside the package
from ..keytext import KEY_HELP, b64, check_public_key, decode_key, from_hex, key_hex  # noqa: F401


def generate_keypair() -> tuple[str, str]:
    """A new (private, public) X25519 key pair, both base64 as WireGuard writes them."""
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return b64(raw), public_key_of(b64(raw))


def public_key_of(private_b64: str) -> str:
    raw = decode_key(private_b64, "private key")
    key = X25519PrivateKey.from_private_bytes(raw)
    return b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
