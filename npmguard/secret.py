"""A wrapper that keeps credential values out of reprs, logs and tracebacks."""

from __future__ import annotations

import hashlib
import hmac

# Values this short show no tail at all, because four characters would be
# most of the secret.
_MIN_LEN_FOR_TAIL = 12


class Secret:
    """A credential value whose ``str`` and ``repr`` show at most its last 4 chars.

    Only the injection edge (environment for a child, stdout of the token
    helper, the keychain) calls ``reveal``.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def tail(self) -> str:
        """The last 4 characters, or nothing for short values."""
        if len(self._value) < _MIN_LEN_FOR_TAIL:
            return ""
        return self._value[-4:]

    @property
    def fingerprint(self) -> str:
        """A short stable hash that identifies the value without revealing it."""
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret(…{self.tail}, fp={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __len__(self) -> int:
        return len(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> object:
        raise TypeError("Secret values are not picklable")


def fingerprint(value: str) -> str:
    """Return the first 12 hex digits of SHA-256 over the value.

    48 bits are enough to tell a user's tokens apart and too few to help a
    brute-force search against a high-entropy token.
    """
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]
