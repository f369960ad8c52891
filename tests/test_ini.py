"""The ini reader against npm's own ``ini`` package, shape by shape.

Every config text in ``SHAPES`` goes through ``Document.from_text`` here and
through ``ini.parse`` from the npm that is installed (run by node, with no
environment but PATH), and the top-level results must match. The same
shapes check that a document dumps back to its exact text and that
replacing one entry's value span changes that value and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from npmguard.npmrc.ini import Document, decode_value, encode_value

# One shape per line break style: the base texts use "\n" and are repeated
# with "\r\n", "\r" and a UTF-8 BOM in front.
BASE_SHAPES: dict[str, str] = {
    "empty": "",
    "blank lines": "\n\n\na=1\n\n\nb=2\n\n",
    "plain pair": "registry=https://registry.example.com/\n",
    "no final newline": "a=1\nb=2",
    "spaces around equals": "a = 1\nb= 2\nc =3\n\td\t=\t4\t\n",
    "equals in value": "a=b=c\nurl=https://h/?x=1&y=2\n",
    "equals only": "=value\n",
    "blank key": " =value\n",
    "key without equals": "flag\nother ; comment\n",
    "key then equals nothing": "a=\nb =\nc=   \n",
    "semicolon comment": "; a comment\na=1\n",
    "hash comment": "# a comment\na=1\n",
    "indented comments": "   ; indented\n\t# tabbed\na=1\n",
    "comment with equals": "; a=1\n# b=2\nc=3\n",
    "inline semicolon": "a=1 ; note\nb=2;note\n",
    "inline hash": "a=1 # note\nb=2#note\n",
    "escaped semicolon": "a=x\\;y\nb=x\\;y;cut\n",
    "escaped hash": "a=x\\#y\nb=x\\#y#cut\n",
    "escaped backslash": "a=x\\\\y\nb=x\\\\;cut\n",
    "other escapes kept": "a=x\\ny\nb=x\\ty\nc=end\\\n",
    "url fragment cut": "a=https://h/path#frag\n",
    "double quoted": 'a="quoted value"\n',
    "double quoted comment chars": 'a="x;y#z"\n',
    "double quoted json escapes": 'a="tab\\tnl\\nq\\"u\\u00e9"\n',
    "double quoted unicode escape": 'a="\\u2028\\ud83d\\ude00"\n',
    "double quoted bad escape": 'a="bad\\qescape"\n',
    "double quoted inner quote": 'a="x"y"\n',
    "double quoted inline comment": 'a="x" ; comment\nb="y" # comment\n',
    "double quoted spaces": 'a="  padded  "\nb = " x "  \n',
    "single quoted": "a='quoted value'\n",
    "single quoted comment chars": "a='x;y#z'\n",
    "single quoted inline comment": "a='x' ; comment\n",
    "single quoted json string": "a='\"inner\"'\n",
    "single quoted backslash": "a='x\\ty'\n",
    "lone quote": "a=\"\nb='\n",
    "mismatched quotes": "a=\"x'\nb='x\"\n",
    "empty quotes": "a=\"\"\nb=''\n",
    "quoted key": "\"quoted key\"=1\n'single key'=2\n",
    "quoted key with equals": '"a=b"=c\n',
    "key with semicolon": "a;b=c\n",
    "key with escaped semicolon": "a\\;b=c\n",
    "array": "a[]=1\na[]=2\na[]=3\n",
    "array single": "a[]=only\n",
    "array then plain": "a[]=1\na=2\n",
    "plain then array": "a=1\na[]=2\na[]=3\n",
    "array key only": "a[]\na[]\n",
    "bracket key too short": "[]=x\n",
    "quoted array key": '"a[]"=1\n"a[]"=2\n',
    "section": "a=1\n[sec]\nb=2\n",
    "section only": "[sec]\n",
    "section with spaces": "a=1\n[sec]   \nb=2\n",
    "section leading space": " [sec]\nb=2\n",
    "section with trailing text": "[sec] x\nb=2\n",
    "section quoted": '["sec"]\nb=2\n',
    "section empty name": "[]\nb=2\n",
    "section repeated": "[s]\na=1\n[t]\nb=2\n[s]\nc=3\n",
    "section dotted": "a=1\n[x.y]\nb=2\n",
    "section replaces falsy key": "a=\nb=false\nc=1\n[a]\nk=1\n[b]\nk=2\n[c]\nk=3\n",
    "section dotted replaces key": "a=1\nb=2\n[a.x]\nk=1\n",
    "section escaped dot": "a.b=1\nc=2\n[a\\.b]\nk=1\n",
    "section proto": "a=1\n[__proto__]\nb=2\n",
    "section proto dotted": "b=1\n[__proto__.b]\nk=2\n",
    "section over array": "a[]=1\n[a]\nb=2\n",
    "section with equals": "[a=b]\nc=1\n",
    "credential in section": "[sec]\n//r.example/:_authToken=abcdef\n",
    "proto key": "__proto__=1\na=2\n",
    "proto array key": "__proto__[]=1\na=2\n",
    "duplicate keys": "a=1\na=2\na=3\n",
    "duplicate credential": "//r/:_authToken=one\n//r/:_authToken=two\n",
    "booleans": "a=true\nb=false\nc=TRUE\nd=True\n",
    "null": "a=null\nb=NULL\n",
    "quoted booleans": 'a="true"\nb=\'false\'\nc="null"\n',
    "single quoted null": "a='null'\n",
    "env reference": "a=${NPM_TOKEN}\nb=pre${X}post\nc=${X?}\n",
    "env reference key": "${REG}:_authToken=abc\n//${HOST}/:_authToken=${T}\n",
    "escaped env reference": "a=\\${NPM_TOKEN}\n",
    "credential keys": (
        "//registry.npmjs.org/:_authToken=npm_abcdef\n"
        "//r.example/npm/:_auth=dXNlcjpwYXNz\n"
        "//r.example/:username=me\n"
        "//r.example/:_password=cGFzcw==\n"
        "//r.example/:certfile=/c.pem\n"
        "//r.example/:keyfile=/k.pem\n"
        "//r.example/:tokenHelper=/bin/helper\n"
    ),
    "scope registry": "@org:registry=https://npm.example.com/\n",
    "nbsp around value": "a=\u00a0x\u00a0\n",
    "nbsp around key": "\u00a0a\u00a0=1\n",
    "feff mid file": "a=1\n\ufeffb=2\n\ufeff[sec]\nc=3\n",
    "feff around value": "a=\ufeffx\ufeff\n",
    "u2028 in value": "a=x\u2028y\nb=2\n",
    "u2029 in value": "a=x\u2029y\n",
    "u2028 in key": "a\u2028b=1\nc\u2028d\n",
    "u2028 only line": "\u2028\na=1\n",
    "u2028 quoted": 'a="x\u2028y"\n',
    "ideographic space": "a=\u3000x\u3000\n",
    "vertical tab and form feed": "a=\x0bx\x0c\n",
    "other unicode text": "a=caf\u00e9 \u65e5\u672c \U0001f600\n",
    "control chars kept": "a=x\x01y\x1f\n",
    "zero width space kept": "a=\u200bx\u200b\n",
    "nel kept": "a=x\x85\n",
    "comment then section": "; [not]\n[sec]\na=1\n",
    "long value": "a=" + "x" * 5000 + "\n",
    "many keys": "".join(f"k{i}=v{i}\n" for i in range(200)),
    "npmguard marker": (
        "; npmguard:0123456789 //r.example/:_authToken=<keychain>\n"
        "registry=https://r.example/\n"
    ),
    "helper marker": ("; npmguard:token-helper\n//r.example/:tokenHelper=/x/helper\n"),
}

# Texts whose line breaks are the point, kept exactly as written.
FIXED_SHAPES: dict[str, str] = {
    "mixed breaks": "a=1\r\nb=2\rc=3\nd=4\r\n",
    "lf cr pair": "a=1\n\rb=2\n\r",
    "crlf blank runs": "a=1\r\n\r\n\r\nb=2\r\n",
    "cr only file": "\r\r\r",
    "trailing cr": "a=1\r",
    "bom only": "\ufeff",
    "bom then section": "\ufeff[sec]\na=1\n",
    "bom then comment": "\ufeff; comment\na=1\n",
    "bom then blank": "\ufeff\n[sec]\na=1\n",
    "bom then pair": "\ufeffa=1\n",
    "double bom": "\ufeff\ufeffa=1\n",
    "bom crlf section": "\ufeff[sec]\r\na=1\r\n",
    "nul byte": "a=x\x00y\n",
}


def _expand(base: dict[str, str]) -> dict[str, str]:
    shapes: dict[str, str] = {}
    for name, text in base.items():
        shapes[name] = text
        if "\n" in text:
            shapes[name + " crlf"] = text.replace("\n", "\r\n")
            shapes[name + " cr"] = text.replace("\n", "\r")
        shapes[name + " bom"] = "\ufeff" + text
    return shapes


SHAPES: dict[str, str] = {**_expand(BASE_SHAPES), **FIXED_SHAPES}

# Reads a JSON list of texts on stdin and writes, for each, the top-level
# keys of ini.parse whose values are not section objects. A number (from a
# single-quoted JSON number) is tagged so it cannot pass for a string.
NODE_SCRIPT = r"""
const ini = require(process.argv[1])
let data = ''
process.stdin.setEncoding('utf8')
process.stdin.on('data', (chunk) => { data += chunk })
process.stdin.on('end', () => {
  const results = JSON.parse(data).map((text) => {
    let parsed
    try {
      parsed = ini.parse(text)
    } catch (err) {
      return { error: String(err && err.message) }
    }
    const top = Object.create(null)
    for (const [key, value] of Object.entries(parsed)) {
      if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
        continue
      }
      top[key] = typeof value === 'number' ? { number: value } : value
    }
    return { top }
  })
  process.stdout.write(JSON.stringify(results))
})
"""


def _npm_ini_dir() -> Path | None:
    """Return the ``ini`` package bundled with the npm on PATH, or None."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return None
    # npm is a symlink to <npm package>/bin/npm-cli.js.
    package = Path(os.path.realpath(npm)).parent.parent
    ini_dir = package / "node_modules" / "ini"
    return ini_dir if (ini_dir / "package.json").is_file() else None


def node_parse(texts: list[str]) -> list[dict[str, object]]:
    """Run npm's ``ini.parse`` on each text in one node process."""
    ini_dir = _npm_ini_dir()
    if ini_dir is None:
        pytest.skip("node or npm's bundled ini package is not installed")
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, "-e", NODE_SCRIPT, str(ini_dir)],
        input=json.dumps(texts).encode(),
        capture_output=True,
        env={"PATH": os.environ.get("PATH", os.defpath)},
        timeout=60,
        check=True,
    )
    parsed: list[dict[str, object]] = json.loads(result.stdout)
    return parsed


@pytest.fixture(scope="module")
def npm_results() -> dict[str, dict[str, object]]:
    names = list(SHAPES)
    return dict(zip(names, node_parse([SHAPES[n] for n in names]), strict=True))


def test_shapes_count() -> None:
    # A floor, so that a bad edit that drops shapes fails loudly.
    assert len(SHAPES) >= 300


@pytest.mark.parametrize("name", list(SHAPES))
def test_parse_matches_npm(
    name: str, npm_results: dict[str, dict[str, object]]
) -> None:
    expected = npm_results[name]
    assert "error" not in expected, expected
    assert Document.from_text(SHAPES[name]).values() == expected["top"]


@pytest.mark.parametrize("name", list(SHAPES))
def test_dump_lossless(name: str) -> None:
    text = SHAPES[name]
    assert Document.from_text(text).dump() == text


def _entry_view(document: Document) -> list[tuple[object, ...]]:
    return [
        (e.line.number, e.section, e.key, e.is_array, e.value) for e in document.entries
    ]


@pytest.mark.parametrize("name", list(SHAPES))
def test_span_replace(name: str) -> None:
    text = SHAPES[name]
    document = Document.from_text(text)
    before = _entry_view(document)
    prefix = "\ufeff" if document.has_bom else ""
    for index, entry in enumerate(document.entries):
        if "=" not in document.line_text(entry.line):
            continue  # A bare key has no value text to replace.
        body = document.text
        edited = body[: entry.value_start] + "REPLACED" + body[entry.value_end :]
        after = Document.from_text(prefix + edited)
        expected = list(before)
        expected[index] = before[index][:4] + ("REPLACED",)
        assert _entry_view(after) == expected, (name, entry.key)


def test_parse_bom_section() -> None:
    # Node keeps the BOM, so npm reads "\ufeff[sec]" as a key, not a section.
    document = Document.from_text("\ufeff[sec]\n//r/:_authToken=x\n")
    assert document.entries[1].section is None


def test_parse_null_value() -> None:
    assert Document.from_text("a=null\n").values() == {"a": None}


def test_parse_array_keeps_plain() -> None:
    values = Document.from_text("a[]=1\na=2\n").values()
    assert values == {"a": ["1", "2"]}


def test_parse_section_claims_empty_key() -> None:
    assert Document.from_text("a=\n[a]\nb=1\n").values() == {}


def test_parse_section_keeps_truthy_key() -> None:
    assert Document.from_text("a=x\n[a]\nb=1\n").values() == {"a": "x"}


def test_parse_dotted_section_replaces_key() -> None:
    assert Document.from_text("a=x\n[a.b]\nc=1\n").values() == {}


def test_parse_single_quoted_number() -> None:
    # npm's ini returns the number 123 here; npmguard keeps the text, which
    # is what npm sends when the number ends up in a header.
    assert Document.from_text("a='123'\n").values() == {"a": "123"}


def test_parse_single_quoted_number_npm() -> None:
    result = node_parse(["a='123'\n"])[0]
    assert result["top"] == {"a": {"number": 123}}


def test_parse_env_kept() -> None:
    values = Document.from_text("a=${NPM_TOKEN}\n").values()
    assert values == {"a": "${NPM_TOKEN}"}


def test_parse_lines_crlf() -> None:
    document = Document.from_text("a=1\r\nb=2\r\n")
    assert [e.line.number for e in document.entries] == [1, 2]


def test_newline_style_crlf() -> None:
    assert Document.from_text("a=1\r\nb=2\r\nc=3\n").newline_style() == "\r\n"


def test_newline_style_none() -> None:
    assert Document.from_text("a=1").newline_style() == "\n"


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "",
        " padded ",
        "x;y",
        "x#y",
        "back\\slash",
        "true",
        "null",
        '"quoted"',
        "'single'",
        "\u00a0nbsp",
        "\u2028",
        "${VAR}",
    ],
)
def test_encode_roundtrip(value: str) -> None:
    assert decode_value(encode_value(value)) == value
