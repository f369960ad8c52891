"""Credential detection in one parsed config file."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from npmguard.npmrc.credentials import (
    Finding,
    find_credentials,
    parse_marker,
    restored_line,
    secured_line,
    vault_name,
)
from npmguard.npmrc.ini import Document

TOKEN = "npm_0123456789abcdefghijklmnopqrstuvwxyzAB"
PATH = Path("/project/.npmrc")


def findings(text: str) -> list[Finding]:
    return find_credentials(PATH, Document.from_text(text))


def only(text: str) -> Finding:
    found = findings(text)
    assert len(found) == 1, found
    return found[0]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_token_state() -> None:
    assert only(f"//r.example/:_authToken={TOKEN}\n").state == "plaintext"


def test_token_registry() -> None:
    found = only(f"//r.example/npm/:_authToken={TOKEN}\n")
    assert (found.registry, found.kind) == ("//r.example/npm/", "_authToken")


def test_token_value() -> None:
    found = only(f"//r.example/:_authToken={TOKEN}\n")
    assert found.value is not None and found.value.reveal() == TOKEN


def test_token_fingerprint() -> None:
    found = only(f"//r.example/:_authToken={TOKEN}\n")
    assert found.fingerprint is not None and len(found.fingerprint) == 12


def test_token_quoted() -> None:
    found = only(f'//r.example/:_authToken="{TOKEN}" ; note\n')
    assert found.value is not None and found.value.reveal() == f'"{TOKEN}"'


def test_token_json_quoted() -> None:
    found = only(f'//r.example/:_authToken="{TOKEN}"\n')
    assert found.value is not None and found.value.reveal() == TOKEN


def test_token_line() -> None:
    assert only(f"; c\n\n//r.example/:_authToken={TOKEN}\n").line == 3


def test_token_exposed() -> None:
    assert only(f"//r.example/:_authToken={TOKEN}\n").is_exposed


def test_token_json_hides_value() -> None:
    found = only(f"//r.example/:_authToken={TOKEN}\n")
    assert TOKEN[-8:] not in json.dumps(found.to_json())


def test_auth_user() -> None:
    found = only(f"//r.example/:_auth={b64('alice:' + TOKEN)}\n")
    assert found.detail == "user alice"


def test_auth_unpadded() -> None:
    value = b64("bob:pw1").rstrip("=")
    assert only(f"//r.example/:_auth={value}\n").detail == "user bob"


def test_auth_url_safe() -> None:
    value = base64.urlsafe_b64encode(b"dave:??>>").decode()
    assert only(f"//r.example/:_auth={value}\n").detail == "user dave"


def test_auth_not_utf8() -> None:
    # Node decodes bad UTF-8 to U+FFFD and still splits at the colon.
    value = base64.b64encode(b"carol:\xfb\xff").decode()
    assert only(f"//r.example/:_auth={value}\n").detail == "user carol"


def test_auth_invalid() -> None:
    found = only("//r.example/:_auth=not*base64!\n")
    assert found.detail == "not valid base64; npm sends it unchanged"


def test_auth_no_colon() -> None:
    found = only(f"//r.example/:_auth={b64('justatoken')}\n")
    assert found.detail == "decodes to no user:password pair"


def test_auth_state() -> None:
    assert only(f"//r.example/:_auth={b64('a:b')}\n").state == "plaintext"


def test_password_valid() -> None:
    assert only(f"//r.example/:_password={b64('pw')}\n").detail == ""


def test_password_invalid() -> None:
    found = only("//r.example/:_password=plain pw!\n")
    assert found.detail.startswith("not valid base64")


@pytest.mark.parametrize(
    ("kind", "state"),
    [
        ("username", "identifier"),
        ("certfile", "path"),
        ("keyfile", "path"),
        ("cert", "identifier"),
        ("key", "plaintext"),
        ("tokenHelper", "helper"),
        ("_authToken", "plaintext"),
        ("_auth", "plaintext"),
        ("_password", "plaintext"),
    ],
)
def test_kind_state(kind: str, state: str) -> None:
    assert only(f"//r.example/:{kind}=value-{kind}\n").state == state


@pytest.mark.parametrize("kind", ["username", "certfile", "keyfile", "cert"])
def test_kind_no_value(kind: str) -> None:
    assert only(f"//r.example/:{kind}=value\n").value is None


def test_inline_key_value() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----"
    found = only(f'//r.example/:key="{pem}"\n')
    assert found.value is not None and found.value.reveal().count("\n") == 2


@pytest.mark.parametrize("key", ["email", "registry", "always-auth", "_authtoken"])
def test_other_keys(key: str) -> None:
    assert findings(f"//r.example/:{key}=x\n{key}=y\n") == []


def test_array_key_skipped() -> None:
    assert findings(f"//r.example/:_authToken[]={TOKEN}\n") == []


def test_legacy_default_registry() -> None:
    assert only(f"_authToken={TOKEN}\n").registry == "//registry.npmjs.org/"


def test_legacy_file_registry() -> None:
    text = f"registry=https://R.example:8443/npm/\n_auth={b64('a:b')}\n"
    assert only(text).registry == "//r.example:8443/npm/"


def test_legacy_registry_after() -> None:
    # npm reads the whole file first, so a later registry= still counts.
    text = f"_authToken={TOKEN}\nregistry=https://r.example/\n"
    assert only(text).registry == "//r.example/"


def test_legacy_bad_registry() -> None:
    text = f"registry=not a url\n_authToken={TOKEN}\n"
    assert only(text).registry == "//registry.npmjs.org/"


def test_legacy_key() -> None:
    assert only(f"_password={b64('pw')}\n").key == "_password"


@pytest.mark.parametrize(
    "value", ["${NPM_TOKEN}", "${NPM_TOKEN?}", "${A}${B}", " ${NPM_TOKEN} "]
)
def test_reference(value: str) -> None:
    assert only(f"//r.example/:_authToken={value}\n").state == "reference"


def test_reference_no_value() -> None:
    assert only("//r.example/:_authToken=${NPM_TOKEN}\n").value is None


def test_reference_mixed() -> None:
    found = only("//r.example/:_authToken=npm_${SUFFIX}\n")
    assert found.detail == "contains an environment reference and literal text"


def test_reference_escaped() -> None:
    # npm turns "\${X}" into the literal text "${X}", which is no reference.
    assert only("//r.example/:_authToken=\\${NPM_TOKEN}\n").state == "plaintext"


@pytest.mark.parametrize(
    "line",
    [
        "_authToken=",
        "_authToken",
        "_authToken=null",
        '_authToken=" "',
        "_authToken=false",
    ],
)
def test_empty_value(line: str) -> None:
    assert only(f"//r.example/:{line}\n").state == "empty"


def test_lone_surrogate() -> None:
    found = only('//r.example/:_authToken="\\ud800abcdefghijkl"\n')
    assert found.value is not None and found.value.reveal().startswith('"\\ud800')


def test_lone_surrogate_detail() -> None:
    found = only('//r.example/:_authToken="\\ud800abcdefghijkl"\n')
    assert "lone surrogate" in found.detail


MARKER = "; npmguard:0123456789 //r.example/:_authToken=<keychain>\n"


def test_marker_state() -> None:
    assert only(MARKER).state == "secured"


def test_marker_vault() -> None:
    found = only(MARKER)
    assert found.vault_name == "//r.example/:_authToken#0123456789"


def test_marker_registry() -> None:
    assert only(MARKER).registry == "//r.example/"


def test_marker_legacy_registry() -> None:
    text = "registry=https://r.example/a/\n; npmguard:0123456789 _auth=<keychain>\n"
    assert only(text).registry == "//r.example/a/"


def test_marker_comment_kept() -> None:
    text = "; npmguard:abcdef0123 //r.example/:_auth=<keychain> ; mine\n"
    assert only(text).kind == "_auth"


@pytest.mark.parametrize(
    "line",
    [
        "; npmguard:012345678 //r.example/:_authToken=<keychain>",
        "; npmguard:0123456789A //r.example/:_authToken=<keychain>",
        "; npmguard:ABCDEF0123 //r.example/:_authToken=<keychain>",
        ";npmguard:0123456789 //r.example/:_authToken=<keychain>",
        "  ; npmguard:0123456789 //r.example/:_authToken=<keychain>",
        "# npmguard:0123456789 //r.example/:_authToken=<keychain>",
        "; npmguard:0123456789 //r.example/:_authToken",
        "; npmguard:token-helper",
    ],
)
def test_marker_rejected(line: str) -> None:
    assert findings(line + "\n") == []


def test_vault_name() -> None:
    assert vault_name("//r/:_auth", "0a1b2c3d4e") == "//r/:_auth#0a1b2c3d4e"


@pytest.mark.parametrize(
    "line",
    [
        f"//r.example/:_authToken={TOKEN}",
        f"  //r.example/:_authToken = {TOKEN}  ; my token",
        f'//r.example/:_authToken="{TOKEN}"',
        f"//r.example/:_authToken='{TOKEN}' # note",
        f"//r.example/:_authToken=a\\;b{TOKEN}",
        f"_auth={b64('a:b')}",
    ],
)
def test_marker_roundtrip(line: str) -> None:
    document = Document.from_text(line + "\n")
    entry = document.entries[0]
    marker_text = secured_line(document, entry, "0123456789")
    marked = Document.from_text(marker_text + "\n")
    marker = parse_marker(marked, marked.lines[0])
    assert marker is not None
    assert restored_line(marker, document.raw(entry), marked) == line


def test_marker_hides_value() -> None:
    document = Document.from_text(f"//r.example/:_authToken={TOKEN} ; c\n")
    text = secured_line(document, document.entries[0], "0123456789")
    assert text == "; npmguard:0123456789 //r.example/:_authToken=<keychain> ; c"


def test_restore_needs_placeholder() -> None:
    marked = Document.from_text("; npmguard:0123456789 //r.example/:_auth=x\n")
    marker = parse_marker(marked, marked.lines[0])
    assert marker is not None
    with pytest.raises(ValueError):
        restored_line(marker, "secret", marked)


def test_shadowed_first() -> None:
    text = f"//r.example/:_authToken=one\n//r.example/:_authToken={TOKEN}\n"
    assert [f.shadowed for f in findings(text)] == [True, False]


def test_shadowed_per_section() -> None:
    text = f"//r.example/:_authToken=one\n[s]\n//r.example/:_authToken={TOKEN}\n"
    assert [f.shadowed for f in findings(text)] == [False, False]


def test_shadowed_marker_by_entry() -> None:
    text = MARKER + f"//r.example/:_authToken={TOKEN}\n"
    assert [f.shadowed for f in findings(text)] == [True, False]


def test_shadowed_entry_before_marker() -> None:
    # Plain npm skips the marker comment and still uses the earlier line.
    text = f"//r.example/:_authToken={TOKEN}\n" + MARKER
    assert [f.shadowed for f in findings(text)] == [False, False]


def test_shadowed_other_kind() -> None:
    text = f"//r.example/:_authToken={TOKEN}\n//r.example/:_auth={b64('a:b')}\n"
    assert [f.shadowed for f in findings(text)] == [False, False]


def test_section_name() -> None:
    text = f"[work]\n//r.example/:_authToken={TOKEN}\n"
    assert only(text).section == "work"


def test_section_empty_name() -> None:
    assert only(f"[]\n//r.example/:_authToken={TOKEN}\n").section == ""


def test_section_top_level() -> None:
    assert only(f"//r.example/:_authToken={TOKEN}\n").section is None


def test_section_marker() -> None:
    assert only("[work]\n" + MARKER).section == "work"


def test_bom_section_is_key() -> None:
    # npm reads "\ufeff[work]" as a key, so the token stays top-level.
    text = f"\ufeff[work]\n//r.example/:_authToken={TOKEN}\n"
    assert only(text).section is None


def test_scope_mapping() -> None:
    text = (
        "@org:registry=https://npm.example.com/\n"
        f"//npm.example.com/:_authToken={TOKEN}\n"
    )
    assert only(text).scopes == ["@org"]


def test_scope_prefix() -> None:
    # npm walks up from the scope's registry to a key that has credentials.
    text = (
        "@org:registry=https://npm.example.com/npm/repo/\n"
        f"//npm.example.com/:_authToken={TOKEN}\n"
    )
    assert only(text).scopes == ["@org"]


def test_scope_most_specific() -> None:
    text = (
        "@org:registry=https://npm.example.com/npm/\n"
        "@other:registry=https://npm.example.com/\n"
        f"//npm.example.com/npm/:_authToken={TOKEN}\n"
        f"//npm.example.com/:_authToken={TOKEN}x\n"
    )
    assert [f.scopes for f in findings(text)] == [["@org"], ["@other"]]


def test_scope_other_host() -> None:
    text = (
        "@org:registry=https://other.example.com/\n"
        f"//npm.example.com/:_authToken={TOKEN}\n"
    )
    assert only(text).scopes == []


def test_scope_in_section_ignored() -> None:
    text = (
        f"//npm.example.com/:_authToken={TOKEN}\n"
        "[s]\n@org:registry=https://npm.example.com/\n"
    )
    assert only(text).scopes == []


def test_order_by_line() -> None:
    text = f"{MARKER}//a.example/:_authToken={TOKEN}\n//b.example/:username=u\n"
    assert [f.line for f in findings(text)] == [1, 2, 3]
