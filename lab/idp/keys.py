"""The provider's signing keys (JWKs, made and used with joserfc): the newest signs new tokens,
every key still held is published in the JWKS. Rotation adds a key; dropping removes all but
the newest (from then on, tokens signed by the old ones no longer verify). The keys live in
STATE/keys.json (0600), so a restart keeps them.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey, import_key

ALGORITHMS = ("RS256", "ES256")


def _new_key(alg: str):
    params = {"kid": f"{alg.lower()}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}",
              "alg": alg, "use": "sig"}
    if alg == "RS256":
        return RSAKey.generate_key(2048, parameters=params, private=True)
    if alg == "ES256":
        return ECKey.generate_key("P-256", parameters=params, private=True)
    raise ValueError(f"unsupported signing algorithm {alg!r}: one of {', '.join(ALGORITHMS)}")


class SigningKeys:
    def __init__(self, path: Path, alg: str = "RS256"):
        self.path = path
        self._lock = threading.Lock()
        self._keys = [import_key(d) for d in json.loads(path.read_text())] if path.exists() else []
        if not self._keys:
            self._keys.append(_new_key(alg))
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([k.as_dict(private=True) for k in self._keys], f)
        os.replace(tmp, self.path)

    @property
    def current(self):
        return self._keys[-1]

    def jwks(self) -> dict:
        with self._lock:
            return {"keys": [k.as_dict(private=False) for k in self._keys]}

    def kids(self) -> list[str]:
        with self._lock:
            return [k.kid for k in self._keys]

    def rotate(self, alg: str | None = None) -> str:
        """A new key signs from now on; the old ones stay in the JWKS until drop_old()."""
        key = _new_key(alg or self.current.alg)
        with self._lock:
            self._keys.append(key)
            self._save()
        return key.kid

    def drop_old(self) -> list[str]:
        """Every key but the current one leaves the JWKS. Returns the kids dropped."""
        with self._lock:
            dropped = [k.kid for k in self._keys[:-1]]
            self._keys = self._keys[-1:]
            self._save()
        return dropped

    def sign(self, claims: dict) -> str:
        key = self.current
        return jwt.encode({"alg": key.alg, "kid": key.kid, "typ": "JWT"}, claims, key, [key.alg])

    def algorithms(self) -> list[str]:
        return sorted({k.alg for k in self._keys} | {"RS256"})
