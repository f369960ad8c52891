"""Nerf-dart keys: how npm names a registry in per-registry config keys.

npm turns ``https://registry.example.com:8443/npm/pkg`` into
``//registry.example.com:8443/npm/``: scheme, user info, query and fragment
go, the host is lower-cased, a default port is dropped, and the path is cut
back to its last ``/`` (the directory the URL names). npm parses the URL
with the WHATWG URL parser, so this module copies the parts of it that
change a key: IDNA and IPv4/IPv6 host forms, ``\\`` as ``/``, dot segments
and percent-encoding of the path.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote, urlsplit

DEFAULT_REGISTRY = "https://registry.npmjs.org/"
_DEFAULT_PORTS = {"http": 80, "https": 443}

# The WHATWG path percent-encode set as Node 20 applies it: C0 controls,
# space, '"', '<', '>', '`', '{', '}' and everything above '~'. '#' and '?'
# never reach the path, and '%' stays as written.
_PATH_ENCODE = frozenset(' "<>`{}')
_TAB_OR_NEWLINE = re.compile(r"[\t\n\r]")
_C0_OR_SPACE = "".join(chr(c) for c in range(0x21))


class InvalidRegistryError(ValueError):
    pass


def nerf_dart(url: str) -> str:
    """Return the ``//host[:port]/path/`` key npm uses for a registry URL.

    A value that already is a nerf-dart key (starts with ``//``) is
    normalised the same way.
    """
    authority, path = _authority_and_path(url)
    return f"//{authority}{path[: path.rfind('/') + 1]}"


def candidate_keys(url: str) -> list[str]:
    """Return the keys npm tries for requests to the registry at ``url``.

    npm-registry-fetch starts from ``//host/path/`` and walks up by cutting
    either the last segment or the trailing slash, down to ``//host``, so
    ``//host/npm:_authToken`` (no slash) counts too. The registry path gets
    a trailing slash first because npm requests ``<registry>/<package>``.
    """
    authority, path = _authority_and_path(url)
    if not path.endswith("/"):
        path += "/"
    key = f"//{authority}{path}"
    keys = []
    while len(key) > 2:
        keys.append(key)
        key = key[:-1] if key.endswith("/") else key[: key.rfind("/") + 1]
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


def _authority_and_path(url: str) -> tuple[str, str]:
    """Return the ``host[:port]`` and the normalised path of an http(s) URL."""
    text = _TAB_OR_NEWLINE.sub("", url).strip(_C0_OR_SPACE)
    if text.startswith("//"):
        text = "https:" + text
    # http and https are "special" schemes, where "\" is a path separator.
    text = text.replace("\\", "/")
    try:
        parts = urlsplit(text)
    except ValueError as err:  # urlsplit checks a bracketed IPv6 host itself
        raise InvalidRegistryError(f"not a valid registry URL: {url!r}") from err
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRegistryError(f"not an http(s) registry URL: {url!r}")
    host = _normalize_host(parts.hostname, url)
    try:
        port = parts.port
    except ValueError as err:
        raise InvalidRegistryError(f"invalid port in registry URL: {url!r}") from err
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return host, _normalize_path(parts.path)


def _normalize_host(hostname: str, url: str) -> str:
    if ":" in hostname:
        try:
            return f"[{ipaddress.IPv6Address(hostname).compressed}]"
        except ValueError as err:
            raise InvalidRegistryError(f"invalid IPv6 host in {url!r}") from err
    host = unquote(hostname).lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as err:
            raise InvalidRegistryError(f"invalid host name in {url!r}") from err
    ipv4 = _parse_ipv4(host, url)
    return host if ipv4 is None else ipv4


def _parse_ipv4(host: str, url: str) -> str | None:
    """Return the dotted form of a WHATWG IPv4 host (``127.1``, ``0x7f.1``)."""
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    if _ipv4_number(labels[-1]) is None:
        return None  # A name: only a numeric last label makes an IPv4 host.
    numbers = [_ipv4_number(label) for label in labels]
    if len(labels) > 4 or any(n is None for n in numbers):
        raise InvalidRegistryError(f"invalid IPv4 host in {url!r}")
    values = [n for n in numbers if n is not None]
    if any(n > 255 for n in values[:-1]) or values[-1] >= 256 ** (5 - len(values)):
        raise InvalidRegistryError(f"invalid IPv4 host in {url!r}")
    address = values[-1]
    for index, number in enumerate(values[:-1]):
        address += number * 256 ** (3 - index)
    return str(ipaddress.IPv4Address(address))


def _ipv4_number(label: str) -> int | None:
    if not label:
        return None
    base = 10
    if label[:2] in ("0x", "0X"):
        label, base = label[2:], 16
        if not label:
            return 0
    elif len(label) > 1 and label[0] == "0":
        label, base = label[1:], 8
    digits = "0123456789abcdef"[:base]
    if not all(c in digits for c in label.lower()):
        return None
    return int(label, base)


def _normalize_path(path: str) -> str:
    """Resolve dot segments and percent-encode the way a WHATWG URL does."""
    if not path:
        return "/"
    segments = path.split("/")[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        lowered = segment.lower()
        if lowered in ("..", ".%2e", "%2e.", "%2e%2e"):
            if out:
                out.pop()
            if last:
                out.append("")
        elif lowered in (".", "%2e"):
            if last:
                out.append("")
        else:
            out.append(_encode_segment(segment))
    return "/" + "/".join(out)


def _encode_segment(segment: str) -> str:
    if segment.isascii() and segment.isprintable() and not (
        _PATH_ENCODE.intersection(segment)
    ):
        return segment
    out: list[str] = []
    for char in segment:
        if char in _PATH_ENCODE or not ("\x20" < char < "\x7f"):
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        else:
            out.append(char)
    return "".join(out)
