"""Nerf-dart keys: how npm names a registry in per-registry config keys.

npm turns ``https://registry.example.com:8443/npm/pkg`` into
``//registry.example.com:8443/npm/``: scheme, query and fragment go, the
host is lower-cased, a default port is dropped, and the path is cut back to
its last ``/`` (the directory the URL names).
"""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_REGISTRY = "https://registry.npmjs.org/"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class InvalidRegistryError(ValueError):
    pass


def nerf_dart(url: str) -> str:
    """Return the ``//host[:port]/path/`` key npm uses for a registry URL.

    A value that already is a nerf-dart key (starts with ``//``) is
    normalised the same way.
    """
    text = url.strip()
    if text.startswith("//"):
        text = "https:" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRegistryError(f"not an http(s) registry URL: {url!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError as err:
        raise InvalidRegistryError(f"invalid port in registry URL: {url!r}") from err
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    path = parts.path or "/"
    path = path[: path.rfind("/") + 1]
    return f"//{host}{path}"


def candidate_keys(url: str) -> list[str]:
    """Return nerf-dart keys to try for ``url``, most specific first.

    npm looks for credentials under the registry's own key, then under each
    shorter path prefix down to ``//host/``.
    """
    key = nerf_dart(url)
    host_end = key.index("/", 2)
    keys = [key]
    path = key[host_end:]
    while path != "/":
        path = path[: path.rstrip("/").rfind("/") + 1]
        keys.append(key[:host_end] + path)
    return keys


def to_url(key: str, scheme: str = "https") -> str:
    """Turn a nerf-dart key back into a URL; the scheme is not in the key."""
    if not key.startswith("//"):
        raise InvalidRegistryError(f"not a nerf-dart key: {key!r}")
    return f"{scheme}:{key}"


def split_credential_key(key: str) -> tuple[str | None, str]:
    """Split ``//host/path/:_authToken`` into ``("//host/path/", "_authToken")``.

    A key that does not start with ``//`` is top-level and has no registry.
    """
    if key.startswith("//"):
        colon = key.rfind(":")
        slash = key.rfind("/")
        if colon > slash:
            return key[:colon], key[colon + 1 :]
    return None, key
