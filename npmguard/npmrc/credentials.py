"""Find credentials in a parsed npm config file.

A credential line is reported in one of these states:

``plaintext``
    the secret value is in the file;
``reference``
    the value is an environment reference such as ``${NPM_TOKEN}``;
``secured``
    npmguard moved the value to the keychain and left a marker comment;
``helper``
    a pnpm ``tokenHelper`` program supplies the value;
``path``
    a client certificate or key file path (the file is not in the config);
``identifier``
    a user name, which is not secret on its own.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path

from npmguard.npmrc.ini import JS_WHITESPACE, Document, Entry, Line, _parse_entry
from npmguard.npmrc.nerf import (
    DEFAULT_REGISTRY,
    InvalidRegistryError,
    candidate_keys,
    nerf_dart,
    split_credential_key,
)
from npmguard.secret import Secret

SECRET_KINDS = ("_authToken", "_auth", "_password", "key")
OTHER_KINDS = ("username", "certfile", "keyfile", "cert", "tokenHelper")
CREDENTIAL_KINDS = SECRET_KINDS + OTHER_KINDS

# A secured line is a comment, so npm and pnpm both skip it. An env reference
# would not be safe: pnpm 10 drops the whole rc file when a referenced
# variable is unset, and npm 11 sends an unset ``${VAR}`` literally as the
# token.
MARKER_PREFIX = "; npmguard:"
PLACEHOLDER = "<keychain>"
HELPER_MARKER = "; npmguard:token-helper"
_MARKER = re.compile(r"^; npmguard:([0-9a-f]{10}) (.*)$")
# npm's env-replace.js pattern: ${NAME} or ${NAME?}, not after a backslash.
_ENV_REFERENCE = re.compile(r"(?<!\\)\$\{[^${}?]+\??\}")

# NOTE: a name-based guess; it flags the common sync clients' default
# folder names and misses custom sync roots.
_SYNCED_DIR_NAMES = ("Dropbox", "OneDrive", "Google Drive", "iCloud Drive", "Box")


@dataclass
class Finding:
    """One credential line in one file."""

    path: Path
    line: int
    key: str
    registry: str | None
    kind: str
    state: str
    fingerprint: str | None = None
    section: str | None = None
    shadowed: bool = False
    scopes: list[str] = field(default_factory=list)
    detail: str = ""
    vault_id: str | None = None
    flags: list[str] = field(default_factory=list)
    # Not part of any output: the parsed entry and, for plaintext, the value.
    entry: Entry | None = field(default=None, repr=False, compare=False)
    value: Secret | None = field(default=None, repr=False, compare=False)

    @property
    def is_movable(self) -> bool:
        """Whether ``secure`` can move this plaintext value into the vault."""
        return self.is_exposed and self.kind != URL_PASSWORD_KIND

    @property
    def is_exposed(self) -> bool:
        return self.state == "plaintext"

    @property
    def vault_name(self) -> str | None:
        """The keychain entry name for a secured credential."""
        if self.vault_id is None:
            return None
        return f"{self.key}#{self.vault_id}"

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "line": self.line,
            "key": self.key,
            "registry": self.registry,
            "kind": self.kind,
            "state": self.state,
            "fingerprint": self.fingerprint,
            "section": self.section,
            "shadowed": self.shadowed,
            "scopes": self.scopes,
            "detail": self.detail,
            "vault_id": self.vault_id,
            "flags": self.flags,
        }


@dataclass(frozen=True)
class Marker:
    """A secured credential line: the marker comment and the entry it hides."""

    vault_id: str
    entry: Entry
    line: Line


def vault_name(key: str, vault_id: str) -> str:
    return f"{key}#{vault_id}"


def parse_marker(document: Document, line: Line) -> Marker | None:
    """Parse a ``; npmguard:ID <original line>`` comment, or return None."""
    text = document.line_text(line)
    match = _MARKER.match(text)
    if match is None:
        return None
    inner_offset = match.start(2)
    inner = Line(line.number, line.start + inner_offset, line.end, line.newline)
    entry = _parse_entry(match.group(2), inner, None)
    if entry is None or not isinstance(entry.value, str):
        return None
    return Marker(match.group(1), entry, line)


# A URL with a password in its userinfo, such as http://user:pass@host/.
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*:([^/?#@\s]+)@")
URL_PASSWORD_KIND = "url-password"


def _url_password(path: Path, entry: Entry) -> Finding | None:
    """Report a password embedded in a URL setting (``registry``, ``proxy``).

    npm sends such a password and writes the URL into its cache, so it is as
    exposed as a token. npmguard reports it but cannot move it, because the
    URL itself is the setting.
    """
    if not isinstance(entry.value, str):
        return None
    match = _URL_PASSWORD.match(entry.value)
    if match is None:
        return None
    secret = Secret(match.group(1))
    finding = Finding(
        path, entry.line.number, entry.key, None, URL_PASSWORD_KIND, "plaintext"
    )
    finding.entry = entry
    finding.value = secret
    finding.fingerprint = secret.fingerprint
    finding.section = entry.section
    finding.detail = (
        f"password inside the {entry.key} URL; npmguard cannot move it, "
        "remove it from the URL and use _authToken or _auth instead"
    )
    return finding


def find_credentials(path: Path, document: Document) -> list[Finding]:
    """Return every credential line of ``document``, in file order.

    A line is ``shadowed`` when a later line of the same section sets the
    same key, so npm uses the later one. A secured marker counts as a line
    for the key it hides, because ``npmguard exec`` hands its value to npm;
    a plaintext line before a marker is still the one plain npm reads, so
    only markers are shadowed by markers and later entries alike.
    """
    file_registry = _file_registry(document)
    findings: list[Finding] = []

    for entry in document.entries:
        registry, kind = split_credential_key(entry.key)
        # NOTE: a key such as "${REG}:_authToken" only names a registry after
        # npm expands it, so it is not reported.
        if kind not in CREDENTIAL_KINDS or entry.is_array:
            url_finding = _url_password(path, entry)
            if url_finding is not None:
                findings.append(url_finding)
            continue
        if registry is None:
            registry = file_registry
        finding = _classify(path, document, entry, registry, kind)
        finding.section = entry.section
        findings.append(finding)

    for comment in document.comments:
        marker = parse_marker(document, comment.line)
        if marker is None:
            continue
        registry, kind = split_credential_key(marker.entry.key)
        findings.append(Finding(
            path=path,
            line=comment.line.number,
            key=marker.entry.key,
            registry=registry or file_registry,
            kind=kind,
            state="secured",
            section=comment.section,
            vault_id=marker.vault_id,
            entry=marker.entry,
        ))

    findings.sort(key=lambda f: f.line)
    last_entry: dict[tuple[str | None, str], int] = {}
    last_any: dict[tuple[str | None, str], int] = {}
    for finding in findings:
        slot = (finding.section, finding.key)
        last_any[slot] = finding.line
        if finding.state != "secured":
            last_entry[slot] = finding.line
    scopes = _scopes_by_registry(document, {f.registry or "" for f in findings})
    for finding in findings:
        slot = (finding.section, finding.key)
        last = last_any if finding.state == "secured" else last_entry
        finding.shadowed = last[slot] != finding.line
        finding.scopes = scopes.get(finding.registry or "", [])
    return findings


def _classify(
    path: Path, document: Document, entry: Entry, registry: str | None, kind: str
) -> Finding:
    finding = Finding(path, entry.line.number, entry.key, registry, kind, "plaintext")
    finding.entry = entry
    value = entry.value if isinstance(entry.value, str) else ""

    if kind == "tokenHelper":
        finding.state = "helper"
        return finding
    if kind in ("certfile", "keyfile"):
        finding.state = "path"
        return finding
    if kind == "username":
        finding.state = "identifier"
        return finding
    if kind == "cert":
        # An inline certificate is public; only the key next to it is secret.
        finding.state = "identifier"
        return finding
    # npm trims a value again after ini, so a quoted " " is empty too.
    if not value.strip(JS_WHITESPACE):
        finding.state = "empty"
        return finding
    if is_reference(value):
        finding.state = "reference"
        return finding

    detail = _describe_value(kind, value)
    if not _encodable(value):
        # A JSON "\ud800" escape decodes to a lone surrogate, which no
        # keychain or header can carry; the escaped text stands in for it.
        value = document.raw(entry)
        detail = "has a lone surrogate escape; npm cannot send it as written"
    secret = Secret(value)
    finding.value = secret
    finding.fingerprint = secret.fingerprint
    finding.detail = detail
    return finding


def is_reference(value: str) -> bool:
    """Return True when ``value`` is only ``${VAR}`` references (and blanks)."""
    return not _ENV_REFERENCE.sub("", value).strip(JS_WHITESPACE)


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe_value(kind: str, value: str) -> str:
    if kind == "_auth":
        decoded = _b64decode(value)
        if decoded is None:
            return "not valid base64; npm sends it unchanged"
        user, colon, _ = decoded.partition(":")
        if not colon:
            return "decodes to no user:password pair"
        return f"user {user}"
    if kind == "_password":
        if _b64decode(value) is None:
            return "not valid base64; npm expects the password base64-encoded"
        return ""
    if _ENV_REFERENCE.search(value):
        return "contains an environment reference and literal text"
    return ""


def _b64decode(value: str) -> str | None:
    """Decode base64 as Node does for well-formed input, or return None.

    Node also takes the URL-safe alphabet and missing padding, and decodes
    bad UTF-8 to U+FFFD. It skips other stray characters too, which this
    treats as invalid.
    """
    text = value.strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None


def _file_registry(document: Document) -> str:
    """Return the nerf-dart key of the file's ``registry`` or npm's default."""
    configured = document.values().get("registry")
    if isinstance(configured, str):
        try:
            return nerf_dart(configured)
        except InvalidRegistryError:
            pass
    return nerf_dart(DEFAULT_REGISTRY)


def _scopes_by_registry(
    document: Document, registries: set[str]
) -> dict[str, list[str]]:
    """Map each credential registry key to the ``@scope``s whose requests use it.

    npm sends a scope's requests with the credential of the most specific
    key that walks up from the scope's registry URL (``candidate_keys``);
    only keys in ``registries`` count.
    """
    scopes: dict[str, list[str]] = {}
    for key, value in document.values().items():
        if not key.startswith("@") or not key.endswith(":registry"):
            continue
        if not isinstance(value, str):
            continue
        try:
            candidates = candidate_keys(value)
        except InvalidRegistryError:
            continue
        for candidate in candidates:
            if candidate in registries:
                scopes.setdefault(candidate, []).append(key[: -len(":registry")])
                break
    return scopes


def synced_folder(path: Path) -> str | None:
    """Return the name of a sync client's folder that contains ``path``."""
    for part in path.parts:
        for name in _SYNCED_DIR_NAMES:
            if part == name or part.startswith(name + " "):
                return name
    return None


def secured_line(document: Document, entry: Entry, vault_id: str) -> str:
    """Return the marker comment that replaces ``entry``'s line."""
    text = document.text
    line = entry.line
    return (
        MARKER_PREFIX
        + vault_id
        + " "
        + text[line.start : entry.value_start]
        + PLACEHOLDER
        + text[entry.value_end : line.end]
    )


def restored_line(marker: Marker, raw_value: str, document: Document) -> str:
    """Return the original line for a marker, given the value's raw text."""
    inner = document.text[marker.entry.line.start : marker.line.end]
    start = marker.entry.value_start - marker.entry.line.start
    end = marker.entry.value_end - marker.entry.line.start
    if inner[start:end] != PLACEHOLDER:
        raise ValueError("marker line has no placeholder where the value was")
    return inner[:start] + raw_value + inner[end:]
