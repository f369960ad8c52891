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
from npmguard.registry.detect import PROVIDERS, detect_kind, provider_for

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
