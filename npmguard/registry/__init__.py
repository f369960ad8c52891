"""Registry token providers: who a token belongs to, create, rotate, revoke.

``provider_for(url)`` picks the provider for a registry; ``base`` contains the
interface and errors every provider shares.
"""

from npmguard.registry.base import (
    PUBLISH,
    READ_ONLY,
    Auth,
    Capabilities,
    IssuedToken,
    NotSupportedError,
    OtpRequiredError,
    PasswordRequiredError,
    Provider,
    RegistryError,
    RegistryUnreachableError,
    TokenInfo,
    TokenRejectedError,
)


def __getattr__(name: str) -> object:
    # The providers need urllib and ssl, about 20 ms to import. The daemon
    # and the token path import the errors and types above without calling
    # any registry, so those must not load them.
    if name in ("PROVIDERS", "detect_kind", "provider_for"):
        from npmguard.registry import detect

        return getattr(detect, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "PROVIDERS",
    "PUBLISH",
    "READ_ONLY",
    "Auth",
    "Capabilities",
    "IssuedToken",
    "NotSupportedError",
    "OtpRequiredError",
    "PasswordRequiredError",
    "Provider",
    "RegistryError",
    "RegistryUnreachableError",
    "TokenInfo",
    "TokenRejectedError",
    "detect_kind",
    "provider_for",
]
