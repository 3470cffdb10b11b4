"""A WireGuard public key is taken only as WireGuard spells it: base64 leaves two unused bits in
a 32-byte key's last character, and a key compared as text ("held by another device?") must be
the key itself, not one of its four spellings."""
import base64

import pytest

from control.errors import InputError
from control.files import parse_identities
from control.wireguard import check_public_key, generate_keypair

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def other_spellings(key: str) -> list[str]:
    """The key's other base64 spellings: its last character with the unused bits set."""
    last = ALPHABET.index(key[-2])
    return [key[:-2] + ALPHABET[(last & ~3) | low] + "=" for low in range(4) if (last & ~3) | low != last]


def test_only_wireguards_spelling_of_a_key_is_taken():
    _, public = generate_keypair()
    assert check_public_key(public) == public
    spellings = other_spellings(public)
    assert len(spellings) == 3
    for other in spellings:
        assert base64.b64decode(other) == base64.b64decode(public)      # the same 32 bytes
        with pytest.raises(InputError, match="not spelled as WireGuard spells it") as refused:
            check_public_key(other)
        assert repr(public) in str(refused.value)                       # says what to write


def test_an_identities_file_with_another_spelling_is_refused():
    _, public = generate_keypair()
    doc = {"users": [{"email": "a@example.com"}],
           "devices": [{"name": "a-laptop", "user": "a@example.com", "tunnel_ipv4": "100.96.0.2",
                        "public_key": other_spellings(public)[0]}]}
    with pytest.raises(InputError, match="not spelled as WireGuard spells it"):
        parse_identities(doc, "identities.yaml")
