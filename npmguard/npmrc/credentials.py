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

from npmguard.npmrc.ini import Document, Entry, Line, _parse_entry
from npmguard.npmrc.nerf import (
    DEFAULT_REGISTRY,
    InvalidRegistryError,
    nerf_dart,
    split_credential_key,
)
from npmguard.secret import Secret

SECRET_KINDS = ("_authToken", "_auth", "_password", "key")
OTHER_KINDS = ("username", "certfile", "keyfile", "cert", "tokenHelper")
CREDENTIAL_KINDS = SECRET_KINDS + OTHER_KINDS

# A secured line is a comment, so npm and pnpm both skip it. Any env
# reference left in an rc file makes pnpm 10 drop that whole file when the
# variable is unset, and npm 11 sends an unset ``${VAR}`` literally as the
# token, so a comment is the one form that is harmless to every tool.
MARKER_PREFIX = "; npmguard:"
PLACEHOLDER = "<keychain>"
HELPER_MARKER = "; npmguard:token-helper"
_MARKER = re.compile(r"^; npmguard:([0-9a-f]{10}) (.*)$")
_ENV_REFERENCE = re.compile(r"^\$\{[^${}]+\}$")

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


def find_credentials(path: Path, document: Document) -> list[Finding]:
    """Return every credential line of ``document``, in file order."""
    file_registry = _file_registry(document)
    scopes = _scopes_by_registry(document)
    findings: list[Finding] = []

    last_line_of_key: dict[tuple[str | None, str], int] = {}
    for entry in document.entries:
        last_line_of_key[(entry.section, entry.key)] = entry.line.number

    for entry in document.entries:
        registry, kind = split_credential_key(entry.key)
        if kind not in CREDENTIAL_KINDS or entry.is_array:
            continue
        if registry is None:
            registry = file_registry
        finding = _classify(path, document, entry, registry, kind)
        finding.section = entry.section
        finding.shadowed = last_line_of_key[(entry.section, entry.key)] != (
            entry.line.number
        )
        finding.scopes = scopes.get(registry or "", [])
        findings.append(finding)

    for comment in document.comments:
        marker = parse_marker(document, comment.line)
        if marker is None:
            continue
        registry, kind = split_credential_key(marker.entry.key)
        finding = Finding(
            path=path,
            line=comment.line.number,
            key=marker.entry.key,
            registry=registry or file_registry,
            kind=kind,
            state="secured",
            section=comment.section,
            vault_id=marker.vault_id,
            entry=marker.entry,
        )
        finding.scopes = scopes.get(finding.registry or "", [])
        findings.append(finding)

    findings.sort(key=lambda f: f.line)
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
    if not value:
        finding.state = "empty"
        return finding
    if _ENV_REFERENCE.match(value):
        finding.state = "reference"
        return finding

    secret = Secret(value)
    finding.value = secret
    finding.fingerprint = secret.fingerprint
    finding.detail = _describe_value(kind, value)
    return finding


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
    if kind == "_authToken" and "${" in value:
        return "contains an environment reference and literal text"
    return ""


def _b64decode(value: str) -> str | None:
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
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


def _scopes_by_registry(document: Document) -> dict[str, list[str]]:
    scopes: dict[str, list[str]] = {}
    for key, value in document.values().items():
        if not key.startswith("@") or not key.endswith(":registry"):
            continue
        if not isinstance(value, str):
            continue
        try:
            nerf = nerf_dart(value)
        except InvalidRegistryError:
            continue
        scopes.setdefault(nerf, []).append(key[: -len(":registry")])
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
