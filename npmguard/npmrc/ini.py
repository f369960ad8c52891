"""A lossless reader for npm's ini dialect.

The rules follow the ``ini`` package that npm 11 and pnpm 10 use to read
``.npmrc`` files:

* lines are split on any run of ``\\r`` and ``\\n``;
* a line whose first non-blank character is ``;`` or ``#`` is a comment;
* ``[name]`` starts a section, and keys under it are not top-level config;
* the first ``=`` splits key from value, and both are trimmed with
  JavaScript's notion of whitespace (which includes U+FEFF);
* an unquoted value ends at the first unescaped ``;`` or ``#``, while
  ``\\;``, ``\\#`` and ``\\\\`` are escapes;
* a value wrapped in matching quotes is taken whole: ``'x'`` loses its
  quotes, ``"x"`` is decoded as a JSON string when it is one;
* a key ending in ``[]`` appends to an array, and so does a plain ``key=``
  line once the key has an array; otherwise the last duplicate wins;
* ``true`` and ``false`` become booleans and ``null`` becomes None, quoted
  or not;
* a U+FEFF at the very start is not whitespace to the section pattern, so
  ``\ufeff[name]`` on the first line is a key, not a section (Node reads
  the file with its BOM).

npm then expands ``${VAR}`` in keys and values (``@npmcli/config``'s
``env-replace.js``); that is not part of this layer. ``values()`` returns
the text before expansion; ``npmrc.credentials`` reports a value that is a
whole ``${VAR}`` reference as a ``reference`` and ``inject.resolve`` reads
the variable when it hands the credential out.

Nothing is re-encoded: a parsed file keeps its exact text, and each entry
records the character offsets of its key and value so that an edit replaces
one span and leaves every other byte alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

# JavaScript's String.prototype.trim() whitespace. Python's str.strip() differs:
# it keeps U+FEFF and strips a few control characters that JavaScript keeps.
JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SECTION = re.compile(r"^\[([^\]]*)\][" + re.escape(JS_WHITESPACE) + r"]*$")
# JavaScript's "." stops at these, so npm's `^([^=]+)(=(.*))?$` never matches
# a line whose value contains one of them, and the line is ignored.
_JS_LINE_TERMINATORS = "\u2028\u2029"

BOM = "\ufeff"

Value = str | bool | None
_MISSING: Final = object()


@dataclass(frozen=True)
class Line:
    """One physical line of the file.

    ``start`` and ``end`` are offsets into ``Document.text`` that exclude the
    line break; ``newline`` is the break itself (empty on a last line with
    none).
    """

    number: int
    start: int
    end: int
    newline: str


@dataclass(frozen=True)
class Entry:
    """A ``key = value`` line as npm reads it.

    ``value_start``/``value_end`` cover the raw value text that npm decodes
    into ``value``: the trimmed text after ``=`` up to an inline comment, or
    the whole quoted string. Replacing that span replaces the value. A key
    with no ``=`` has the value True and an empty span at the end of the
    line; writing into that span would extend the key, not set a value.
    """

    line: Line
    section: str | None
    key: str
    is_array: bool
    value: str | bool | None
    value_start: int
    value_end: int


@dataclass(frozen=True)
class Comment:
    """A comment line, with its text after the leading blanks."""

    line: Line
    section: str | None
    body: str


class Document:
    """The parsed form of one config file's text (BOM removed)."""

    def __init__(self, text: str, *, has_bom: bool = False) -> None:
        self.text = text
        self.has_bom = has_bom
        self.lines: list[Line] = list(_split_lines(text))
        self.entries: list[Entry] = []
        self.comments: list[Comment] = []
        # Decoded section names in file order, repeats included.
        self.section_names: list[str] = []
        self._parse()

    @classmethod
    def from_text(cls, text: str) -> Document:
        if text.startswith(BOM):
            return cls(text[1:], has_bom=True)
        return cls(text)

    def dump(self) -> str:
        """Return the full file text, BOM included; equal to the input."""
        return (BOM if self.has_bom else "") + self.text

    def line_text(self, line: Line) -> str:
        return self.text[line.start : line.end]

    def raw(self, entry: Entry) -> str:
        return self.text[entry.value_start : entry.value_end]

    def newline_style(self) -> str:
        """Return the most common line break, ``\\n`` for files with none."""
        counts: dict[str, int] = {}
        for line in self.lines:
            if line.newline:
                counts[line.newline] = counts.get(line.newline, 0) + 1
        if not counts:
            return "\n"
        return max(counts, key=lambda nl: counts[nl])

    def values(self) -> dict[str, Value | list[Value]]:
        """Return top-level config as npm would see it (before env expansion).

        A key that a ``[section]`` turns into an object in npm's result is
        left out, as npm has no usable setting under that name.
        """
        result: dict[str, Value | list[Value]] = {}
        for entry in self.entries:
            if entry.section is not None:
                continue
            existing = result.get(entry.key, _MISSING)
            if isinstance(existing, list):
                # npm keeps an array once there is one, even for "key=".
                existing.append(entry.value)
            elif not entry.is_array:
                result[entry.key] = entry.value
            elif existing is _MISSING:
                result[entry.key] = [entry.value]
            else:
                result[entry.key] = [existing, entry.value]  # type: ignore[list-item]
        for name in _section_objects(self.section_names, result):
            result.pop(name, None)
        return result

    def _parse(self) -> None:
        section: str | None = None
        for line in self.lines:
            content = self.text[line.start : line.end]
            stripped = content.lstrip(JS_WHITESPACE)
            if not stripped:
                continue
            if stripped[0] in ";#":
                self.comments.append(Comment(line, section, stripped))
                continue
            # Node keeps the BOM, so npm's "^\\[" fails on a first line after it.
            at_bom = self.has_bom and line.start == 0
            match = None if at_bom else _SECTION.match(content)
            if match:
                section = decode_value(match.group(1))
                self.section_names.append(section)
                continue
            entry = _parse_entry(content, line, section, after_bom=at_bom)
            if entry is not None:
                self.entries.append(entry)


def _split_lines(text: str) -> Iterator[Line]:
    number = 1
    pos = 0
    for match in _LINE_BREAK.finditer(text):
        yield Line(number, pos, match.start(), match.group())
        number += 1
        pos = match.end()
    if pos < len(text):
        yield Line(number, pos, len(text), "")


def _parse_entry(
    content: str, line: Line, section: str | None, *, after_bom: bool = False
) -> Entry | None:
    """Parse one line as npm's ini does, or return None where npm skips it.

    ``after_bom`` says that a BOM, removed from ``content``, came right
    before it: npm counts it as a key character that trimming then drops.
    """
    equals = content.find("=")
    raw_key = content if equals < 0 else content[:equals]
    if not raw_key and not after_bom:
        return None  # "=value": npm's pattern needs at least one key character
    if equals >= 0 and any(c in _JS_LINE_TERMINATORS for c in content[equals:]):
        return None

    key = decode_value(raw_key)
    is_array = len(key) > 2 and key.endswith("[]")
    if is_array:
        key = key[:-2]
    if key == "__proto__":
        return None

    if equals < 0:
        return Entry(line, section, key, is_array, True, line.end, line.end)

    offset = line.start + equals + 1
    raw = content[equals + 1 :]
    span_start, span_end = _value_span(raw)
    value = _literal(decode_value(raw))
    return Entry(
        line, section, key, is_array, value, offset + span_start, offset + span_end
    )


def _literal(text: str) -> Value:
    """Map npm's three literal words; every other value stays a string."""
    if text == "true":
        return True
    if text == "false":
        return False
    if text == "null":
        return None
    return text


def _split_section_name(name: str) -> list[str]:
    """Split on dots not preceded by a backslash, as ini's ``splitSections``."""
    parts: list[str] = []
    start = 0
    search = 0
    while True:
        dot = name.find(".", search)
        if dot < 0:
            break
        search = dot + 1
        if dot > 0 and name[dot - 1] == "\\":
            continue
        parts.append(name[start:dot])
        start = dot + 1
    parts.append(name[start:])
    return parts


def _section_objects(
    names: list[str], top: dict[str, Value | list[Value]]
) -> set[str]:
    """Return the top-level keys that npm's ini replaces with a section object.

    ``[name]`` claims ``name`` when the key is unset or falsy; afterwards a
    dotted ``[a.b]`` nests under ``a``, replacing a plain value there, and
    ``[a\\.b]`` is renamed to ``a.b``. Only the top level is modelled: the
    nested objects never hold settings npm reads.
    """
    objects: list[str] = []
    claimed: set[str] = set()
    for name in names:
        if name == "__proto__" or name in claimed:
            continue
        current = top.get(name, _MISSING)
        # JavaScript's "out[name] || {}": "", false and null are falsy.
        if current is _MISSING or current in ("", False, None):
            claimed.add(name)
            objects.append(name)
    replaced = set(claimed)
    for name in objects:
        parts = _split_section_name(name)
        last = parts.pop()
        head = [part for part in parts if part != "__proto__"]
        if head:
            value = top.get(head[0], _MISSING)
            # typeof null and typeof [] are "object", so those stay put.
            if value is _MISSING or not (value is None or isinstance(value, list)):
                replaced.add(head[0])
        else:
            renamed = last.replace("\\.", ".")
            if renamed != last:
                replaced.add(renamed)
    return replaced


def _value_span(raw: str) -> tuple[int, int]:
    """Return the offsets, within ``raw``, of the text npm decodes as the value."""
    left = len(raw) - len(raw.lstrip(JS_WHITESPACE))
    trimmed = raw.strip(JS_WHITESPACE)
    if not trimmed:
        return left, left
    if _is_quoted(trimmed):
        return left, left + len(trimmed)
    escaped = False
    end = len(raw)
    for i in range(left, len(raw)):
        char = raw[i]
        if escaped:
            escaped = False
        elif char in ";#":
            end = i
            break
        elif char == "\\":
            escaped = True
    body = raw[left:end].rstrip(JS_WHITESPACE)
    return left, left + len(body)


def _is_quoted(value: str) -> bool:
    return len(value) >= 1 and (
        (value[0] == '"' and value[-1] == '"') or (value[0] == "'" and value[-1] == "'")
    )


def decode_value(raw: str) -> str:
    """Decode a key or value the way npm's ini reader does."""
    value = raw.strip(JS_WHITESPACE)
    if not value:
        return ""
    if _is_quoted(value):
        if value[0] == "'":
            value = value[1:-1]
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        # JSON.parse of a quoted string gives a string; other JSON is kept raw.
        return decoded if isinstance(decoded, str) else value
    out: list[str] = []
    escaped = False
    for char in value:
        if escaped:
            out.append(char if char in "\\;#" else "\\" + char)
            escaped = False
        elif char in ";#":
            break
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    if escaped:
        out.append("\\")
    return "".join(out).strip(JS_WHITESPACE)


_SAFE_VALUE = re.compile(r"[^;#\\\"'" + re.escape(JS_WHITESPACE) + r"]*")


def encode_value(value: str) -> str:
    """Encode ``value`` so that ``decode_value`` returns it unchanged."""
    if _SAFE_VALUE.fullmatch(value) and value not in ("true", "false", "null"):
        return value
    return json.dumps(value, ensure_ascii=False)
