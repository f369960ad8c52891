"""The audit trail: a hash chain on real files that shows every edit and cut."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import realparts
from npmcli import npmguard

from npmguard import audit
from npmguard.secret import Secret

REGISTRY = "//127.0.0.1:4873/"
OTHER_REGISTRY = "//npm.example.com/"
FINGERPRINT = "2b7f0c4e91aa"
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def _fresh_appender() -> Iterator[None]:
    # Each test has its own HOME; the descriptors kept open for the last
    # one's log are closed after it, as a process exit would.
    yield
    audit.close()


def _log() -> Path:
    return audit.audit_path()


def _lines() -> list[bytes]:
    return _log().read_bytes().splitlines()


def _write_lines(lines: list[bytes]) -> None:
    _log().write_bytes(b"".join(line + b"\n" for line in lines))


def _fill(count: int) -> None:
    for number in range(count):
        audit.record(
            "handed-out" if number % 2 else "found",
            registry=REGISTRY if number % 3 else OTHER_REGISTRY,
            fingerprint=f"{number:012x}",
            peer={"pid": 1000 + number, "exe": "node", "parents": ["npm", "bash"]},
            command="npm publish",
        )


def _seal(entry: dict[str, Any]) -> bytes:
    """Return ``entry`` as a log line with a correct ``hash``, as a forger would."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    entry = {**body, "hash": hashlib.sha256(canonical.encode()).hexdigest()}
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def _problem_lines(result: audit.VerifyResult) -> list[int | None]:
    return [problem.line for problem in result.problems]


def _kinds(result: audit.VerifyResult) -> set[str]:
    return {problem.kind for problem in result.problems}


# --------------------------------------------------------------------------
# Records and the chain


def test_chain_many_records_verify() -> None:
    _fill(300)
    result = audit.verify()
    assert result.ok, [str(p) for p in result.problems]
    assert result.count == 300
    assert result.notes == []


def test_record_fields() -> None:
    _fill(2)
    first, second = (json.loads(line) for line in _lines())
    assert first["seq"] == 1
    assert second["seq"] == 2
    assert first["prev"] == "0" * 64
    assert second["prev"] == hashlib.sha256(_lines()[0]).hexdigest()
    assert TIME_RE.fullmatch(first["time"])
    assert first["event"] == "found"
    assert first["peer"] == {"pid": 1000, "exe": "node", "parents": ["npm", "bash"]}


def test_record_hash_canonical() -> None:
    _fill(1)
    line = _lines()[0]
    entry = json.loads(line)
    assert _seal(entry) == line


def test_files_private() -> None:
    _fill(1)
    assert _log().stat().st_mode & 0o777 == 0o600
    assert audit.head_path(_log()).stat().st_mode & 0o777 == 0o600
    assert _log().parent.stat().st_mode & 0o777 == 0o700


def test_head_tracks_last_line() -> None:
    _fill(3)
    head = audit.head_path(_log()).read_text()
    assert head == f"{3:020d} {hashlib.sha256(_lines()[-1]).hexdigest()}\n"


def test_record_replaced_log_continues() -> None:
    _fill(3)
    # An editor that saves through a new file gives the log a new inode; the
    # cached descriptor must not keep appending to the old one.
    data = _log().read_bytes()
    _log().unlink()
    _log().write_bytes(data)
    audit.record("found", fingerprint=FINGERPRINT)
    assert json.loads(_lines()[-1])["seq"] == 4
    assert audit.verify().ok


# --------------------------------------------------------------------------
# Tampering


def test_edit_middle_field_detected() -> None:
    _fill(20)
    lines = _lines()
    entry = json.loads(lines[9])
    entry["fingerprint"] = "ffffffffffff"
    lines[9] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    _write_lines(lines)
    result = audit.verify()
    assert not result.ok
    assert _problem_lines(result)[0] == 10
    assert result.problems[0].kind == "edited"


def test_edit_with_new_hash_detected() -> None:
    _fill(20)
    lines = _lines()
    entry = json.loads(lines[9])
    entry["registry"] = "//changed.example.com/"
    lines[9] = _seal(entry)
    _write_lines(lines)
    result = audit.verify()
    assert _problem_lines(result) == [11]
    assert result.problems[0].kind == "chain"
    assert "line 10" in result.problems[0].message


def test_deleted_line_detected() -> None:
    _fill(20)
    lines = _lines()
    del lines[7]
    _write_lines(lines)
    result = audit.verify()
    assert set(_problem_lines(result)) == {8}
    assert _kinds(result) == {"sequence", "chain"}


def test_swapped_lines_detected() -> None:
    _fill(20)
    lines = _lines()
    lines[4], lines[5] = lines[5], lines[4]
    _write_lines(lines)
    result = audit.verify()
    assert _problem_lines(result)[0] == 5
    assert "edited" not in _kinds(result)


def test_truncated_last_record_detected() -> None:
    _fill(20)
    _write_lines(_lines()[:-1])
    result = audit.verify()
    assert _problem_lines(result) == [20]
    assert result.problems[0].kind == "truncated"


def test_forged_line_wrong_prev_detected() -> None:
    _fill(20)
    last = json.loads(_lines()[-1])
    forged = {**last, "seq": 21, "prev": "f" * 64, "fingerprint": FINGERPRINT}
    with _log().open("ab") as handle:
        handle.write(_seal(forged) + b"\n")
    result = audit.verify()
    assert result.problems[0].line == 21
    assert result.problems[0].kind == "chain"


def test_non_json_line_detected() -> None:
    _fill(5)
    lines = _lines()
    lines.insert(2, b"not json")
    _write_lines(lines)
    result = audit.verify()
    assert result.problems[0].line == 3
    assert result.problems[0].kind == "malformed"


def test_head_missing_detected() -> None:
    _fill(5)
    audit.head_path(_log()).unlink()
    result = audit.verify()
    assert [p.path for p in result.problems] == [audit.head_path(_log())]


def test_log_deleted_detected() -> None:
    _fill(5)
    _log().unlink()
    result = audit.verify()
    assert not result.ok
    assert result.problems[0].path == _log()


def test_truncation_stays_visible_after_record() -> None:
    _fill(10)
    _write_lines(_lines()[:-2])
    audit.record("found", fingerprint=FINGERPRINT)
    result = audit.verify()
    assert _problem_lines(result) == [9]
    assert result.problems[0].kind == "sequence"
    marker = json.loads(_lines()[8])
    assert marker["problem"] == "head-ahead"
    assert marker["head_seq"] == 10
    assert json.loads(_lines()[9])["seq"] == 12


def test_head_missing_recorded() -> None:
    _fill(5)
    audit.close()
    audit.head_path(_log()).unlink()
    audit.record("found", fingerprint=FINGERPRINT)
    marker = json.loads(_lines()[5])
    assert marker["event"] == "failed"
    assert marker["problem"] == "head-missing"
    assert audit.verify().ok


# --------------------------------------------------------------------------
# Crashes


def _tear(data: bytes) -> None:
    with _log().open("ab") as handle:
        handle.write(data)


def test_torn_tail_detected() -> None:
    _fill(20)
    _tear(b'{"command":"npm publish","event":"handed-out","finger')
    result = audit.verify()
    assert _problem_lines(result) == [21]
    assert result.problems[0].kind == "torn-tail"
    assert result.count == 20


def test_torn_tail_skipped_by_read() -> None:
    _fill(3)
    _tear(b'{"command":"npm')
    assert [r["seq"] for r in audit.read()] == [1, 2, 3]


def test_torn_tail_recovered() -> None:
    _fill(20)
    torn = b'{"command":"npm publish","event":"handed-out","finger'
    _tear(torn)
    audit.record("found", fingerprint=FINGERPRINT)
    result = audit.verify()
    assert result.ok, [str(p) for p in result.problems]
    assert [note.line for note in result.notes] == [21]
    assert result.notes[0].kind == "torn-recovered"
    assert _lines()[20] == torn
    marker = json.loads(_lines()[21])
    assert marker["seq"] == 21
    assert marker["problem"] == "torn-line"
    assert marker["line"] == 21
    assert marker["line_sha256"] == hashlib.sha256(torn).hexdigest()
    assert json.loads(_lines()[22])["seq"] == 22


def test_torn_tail_recovered_by_cached_writer() -> None:
    # The process that wrote the first records still caches their end; the
    # torn bytes come from another process that crashed.
    _fill(5)
    _tear(b'{"event":"fo')
    audit.record("found", fingerprint=FINGERPRINT)
    assert audit.verify().ok
    assert [r["seq"] for r in audit.read()] == [1, 2, 3, 4, 5, 6, 7]


def test_torn_terminated_line_recovered() -> None:
    # A crash after the recovery wrote the newline, before its record.
    _fill(5)
    _tear(b'{"event":"fo\n')
    audit.record("found", fingerprint=FINGERPRINT)
    result = audit.verify()
    assert result.ok, [str(p) for p in result.problems]
    assert json.loads(_lines()[6])["line"] == 6


def test_torn_recovered_read_skips() -> None:
    _fill(2)
    _tear(b'{"ev')
    audit.record("found", fingerprint=FINGERPRINT)
    assert [r["seq"] for r in audit.read()] == [1, 2, 3, 4]


def test_unterminated_record_completed() -> None:
    _fill(3)
    data = _log().read_bytes()
    _log().write_bytes(data[:-1])
    before = audit.verify()
    assert before.ok
    assert [note.kind for note in before.notes] == ["unterminated"]
    audit.record("found", fingerprint=FINGERPRINT)
    after = audit.verify()
    assert after.ok
    assert after.count == 4
    assert after.notes == []


def test_head_one_behind_repaired() -> None:
    # A crash between the log write and the head write.
    _fill(5)
    head = audit.head_path(_log())
    old_head = head.read_bytes()
    audit.record("found", fingerprint=FINGERPRINT)
    head.write_bytes(old_head)
    result = audit.verify()
    assert _problem_lines(result) == [6]
    assert result.problems[0].kind == "head"
    audit.close()
    audit.record("found", fingerprint=FINGERPRINT)
    assert audit.verify().ok


def test_head_garbage_recorded() -> None:
    _fill(4)
    audit.close()
    audit.head_path(_log()).write_bytes(b"garbage\n")
    before = audit.verify()
    assert [p.path for p in before.problems] == [audit.head_path(_log())]
    audit.record("found", fingerprint=FINGERPRINT)
    assert json.loads(_lines()[4])["problem"] == "head-unreadable"
    assert audit.verify().ok


def test_long_lines_tail_read() -> None:
    # Lines longer than the first tail window make record read further back.
    long_reason = "r" * audit.MAX_STRING_CHARS
    for number in range(3):
        audit.record("refused", reason=long_reason, detail_a=long_reason,
                     detail_b=long_reason, fingerprint=f"{number:012x}")
    audit.close()
    _tear(b'{"event":"ref')
    audit.record("found", fingerprint=FINGERPRINT)
    result = audit.verify()
    assert result.ok, [str(p) for p in result.problems]
    assert result.count == 5


def test_trailing_garbage_rejected() -> None:
    _fill(2)
    _tear(b"garbage one\ngarbage two\n")
    audit.close()
    with pytest.raises(audit.AuditError) as caught:
        audit.record("found", fingerprint=FINGERPRINT)
    assert str(_log()) in str(caught.value)


# --------------------------------------------------------------------------
# Concurrency

_WRITER = """
import sys
from npmguard import audit
writer = int(sys.argv[1])
for number in range(int(sys.argv[2])):
    audit.record(
        "handed-out",
        registry="//127.0.0.1:4873/",
        fingerprint=f"{writer:04x}{number:08x}",
        peer={"pid": writer},
    )
"""


def test_concurrent_processes_chain() -> None:
    writers, each = 8, 200
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(writer), str(each)],
            env=dict(os.environ),
            stderr=subprocess.PIPE,
        )
        for writer in range(writers)
    ]

    errors = []
    # Readers take the shared lock, so a check while the writers run sees
    # whole lines and a head that matches them.
    checks_while_writing = []
    try:
        while any(proc.poll() is None for proc in procs):
            checks_while_writing.append(audit.verify())
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            errors.append((proc.returncode, err.decode(errors="replace")))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert errors == [(0, "")] * writers
    assert [c.problems for c in checks_while_writing if not c.ok] == []
    result = audit.verify()
    assert result.ok, [str(p) for p in result.problems[:5]]
    records = audit.read()
    assert [r["seq"] for r in records] == list(range(1, writers * each + 1))
    fingerprints = {r["fingerprint"] for r in records}
    assert len(fingerprints) == writers * each


def test_concurrent_threads_chain() -> None:
    def write(writer: int) -> None:
        for number in range(100):
            audit.record("handed-out", fingerprint=f"{writer:04x}{number:08x}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    result = audit.verify()
    assert result.ok
    assert result.count == 800


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_own_lock() -> None:
    # The parent has its descriptors open when it forks; a child that kept
    # them would share the parent's flock and interleave with it.
    audit.record("found", fingerprint=FINGERPRINT)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for number in range(300):
                audit.record("handed-out", fingerprint=f"c{number:011x}")
            code = 0
        finally:
            os._exit(code)
    for number in range(300):
        audit.record("handed-out", fingerprint=f"a{number:011x}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result = audit.verify()
    assert result.ok, [str(p) for p in result.problems[:5]]
    assert result.count == 601


# --------------------------------------------------------------------------
# What a record may hold


@pytest.mark.parametrize(
    "name",
    [
        "token",
        "authToken",
        "auth",
        "password",
        "npm_password",
        "clientSecret",
        "otp",
        "value",
        "api_key",
        "credentials",
        "argv",
        "env",
    ],
)
def test_record_secret_name_rejected(name: str) -> None:
    with pytest.raises(ValueError) as caught:
        audit.record("found", **{name: "x"})
    assert repr(name) in str(caught.value)


def test_record_secret_name_in_peer_rejected() -> None:
    with pytest.raises(ValueError, match="peer.argv"):
        audit.record("handed-out", peer={"pid": 1, "argv": ["npm", "publish"]})


def test_record_token_field_keeps_canary_out(canary: realparts.Canary) -> None:
    with pytest.raises(ValueError) as caught:
        audit.record("handed-out", token=canary)
    assert canary not in str(caught.value)
    assert not _log().exists()


def test_record_token_value_rejected(canary: realparts.Canary) -> None:
    with pytest.raises(ValueError) as caught:
        audit.record("refused", reason=canary)
    assert "'reason'" in str(caught.value)
    assert canary not in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        "//registry.npmjs.org/:_authToken=abcdef",
        "Bearer abcdefgh12345678",
        "https://user:hunter22@npm.example.com/",
    ],
)
def test_record_credential_value_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="looks like a credential"):
        audit.record("found", source=value)


def test_record_fingerprint_format_checked(canary: realparts.Canary) -> None:
    with pytest.raises(ValueError) as caught:
        audit.record("handed-out", fingerprint=canary[:12])
    assert canary[:12] not in str(caught.value)


def test_record_caller_fields_hold_fingerprints(canary: realparts.Canary) -> None:
    secret = Secret(canary)
    audit.record(
        "handed-out",
        registry=REGISTRY,
        kind="_authToken",
        fingerprint=secret.fingerprint,
        source=str(Path.home() / ".npmrc"),
        peer={"pid": 4242, "exe": "node", "parents": ["npm", "bash"]},
        command=audit.command_words(["npm", "publish", "--otp", "123456"]),
        scope="publish",
        expires=1767225600,
        provider="npm",
        reason="served from the daemon cache",
    )
    data = _log().read_bytes() + audit.head_path(_log()).read_bytes()
    record = audit.read()[0]
    assert record["fingerprint"] == secret.fingerprint
    assert record["command"] == "npm publish"
    # No run of 5 characters of the token: the tail that Secret may show is 4.
    pieces = {canary[i : i + 5] for i in range(len(canary) - 4)}
    assert not [piece for piece in pieces if piece.encode() in data]


def test_record_unknown_event_rejected() -> None:
    with pytest.raises(ValueError, match="'event'"):
        audit.record("exfiltrated", fingerprint=FINGERPRINT)


@pytest.mark.parametrize(
    "value",
    [
        object(),
        b"bytes",
        float("nan"),
        {"nested": {"dict": 1}},
        [["list"]],
        [{"pid": 1}],
    ],
    ids=["object", "bytes", "nan", "nested-dict", "nested-list", "list-of-dicts"],
)
def test_record_bad_value_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="'details"):
        audit.record("found", details=value)


def test_record_reserved_field_rejected() -> None:
    with pytest.raises(ValueError, match="'seq'"):
        audit.record("found", seq=7)


def test_record_long_command_rejected() -> None:
    with pytest.raises(ValueError, match="'command'"):
        audit.record("handed-out", command="npm publish --otp 123456")


def test_command_words_two_words() -> None:
    assert audit.command_words(["/usr/bin/npm", "publish", "--otp=1"]) == "npm publish"


def test_command_words_drops_option() -> None:
    assert audit.command_words(["pnpm", "--otp=123456", "publish"]) == "pnpm"


# --------------------------------------------------------------------------
# The command line


def test_cli_missing_log(home: Path) -> None:
    result = npmguard("audit", cwd=home)
    assert result.returncode == 0
    assert result.stdout.strip() == "no audit records yet"


def test_cli_verify_missing_log(home: Path) -> None:
    result = npmguard("audit", "--verify", cwd=home)
    assert result.returncode == 0
    assert result.stdout.strip() == "no audit records yet"


def test_cli_table(home: Path) -> None:
    _fill(3)
    result = npmguard("audit", cwd=home)
    lines = result.stdout.splitlines()
    assert result.returncode == 0
    assert lines[0].split() == [
        "TIME", "(UTC)", "EVENT", "REGISTRY", "FINGERPRINT", "DETAILS"
    ]
    assert len(lines) == 4
    assert "000000000002" in lines[3]
    assert "peer=(pid 1002 node < npm < bash)" in lines[3]
    assert 'command="npm publish"' in lines[3]


def test_cli_limit(home: Path) -> None:
    _fill(60)
    default = npmguard("audit", cwd=home)
    limited = npmguard("audit", "--limit", "2", cwd=home)
    everything = npmguard("audit", "--all", cwd=home)
    assert len(default.stdout.splitlines()) == 51
    assert len(limited.stdout.splitlines()) == 3
    assert len(everything.stdout.splitlines()) == 61
    assert "00000000003b" in limited.stdout.splitlines()[-1]


def test_cli_bad_limit(home: Path) -> None:
    result = npmguard("audit", "--limit", "0", cwd=home)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_cli_json(home: Path) -> None:
    _fill(4)
    result = npmguard("audit", "--json", cwd=home)
    records = json.loads(result.stdout)
    assert result.returncode == 0
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[0]["fingerprint"] == "000000000000"


def test_cli_event_filter(home: Path) -> None:
    _fill(6)
    result = npmguard("audit", "--json", "--event", "found", cwd=home)
    records = json.loads(result.stdout)
    assert [r["seq"] for r in records] == [1, 3, 5]


def test_cli_registry_filter_url(home: Path) -> None:
    _fill(6)
    result = npmguard(
        "audit", "--json", "--registry", "http://127.0.0.1:4873", cwd=home
    )
    records = json.loads(result.stdout)
    assert [r["seq"] for r in records] == [2, 3, 5, 6]


def test_cli_filter_no_match(home: Path) -> None:
    _fill(2)
    result = npmguard("audit", "--event", "revoked", cwd=home)
    assert result.returncode == 0
    assert result.stdout.strip() == "no matching audit records"


def test_cli_verify_intact(home: Path) -> None:
    _fill(12)
    result = npmguard("audit", "--verify", cwd=home)
    assert result.returncode == 0
    assert result.stdout.strip() == "audit trail intact: 12 records"


def test_cli_verify_problem(home: Path) -> None:
    _fill(12)
    lines = _lines()
    del lines[4]
    _write_lines(lines)
    result = npmguard("audit", "--verify", cwd=home)
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"{_log()}:5: ")


def test_cli_verify_torn_tail(home: Path) -> None:
    _fill(3)
    _tear(b'{"eve')
    result = npmguard("audit", "--verify", cwd=home)
    assert result.returncode == 1
    assert f"{_log()}:4: torn last line" in result.stdout


def test_cli_verify_json(home: Path) -> None:
    _fill(3)
    _write_lines(_lines()[:-1])
    result = npmguard("audit", "--verify", "--json", cwd=home)
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["ok"] is False
    assert report["problems"][0]["line"] == 3
    assert report["problems"][0]["kind"] == "truncated"


def test_cli_malformed_line(home: Path) -> None:
    _fill(4)
    lines = _lines()
    lines[2] = b'{"seq": 3, "event": '
    _write_lines(lines)
    result = npmguard("audit", cwd=home)
    assert result.returncode == 2
    assert result.stderr.strip() == f"npmguard: {_log()}:3: not valid JSON"
    assert result.stdout == ""


def test_cli_verify_malformed_line(home: Path) -> None:
    _fill(4)
    lines = _lines()
    lines[2] = b"[1, 2]"
    _write_lines(lines)
    result = npmguard("audit", "--verify", cwd=home)
    assert result.returncode == 1
    assert f"{_log()}:3: not a JSON object" in result.stdout


def test_cli_unreadable_log(home: Path) -> None:
    _log().mkdir(parents=True)
    result = npmguard("audit", cwd=home)
    assert result.returncode == 2
    assert result.stderr.strip() == f"npmguard: {_log()}: Is a directory"


def test_cli_deleted_log(home: Path) -> None:
    _fill(2)
    _log().unlink()
    result = npmguard("audit", cwd=home)
    assert result.returncode == 2
    assert result.stderr.startswith(f"npmguard: {_log()}: missing")
    assert "Traceback" not in result.stderr


def test_cli_output_no_canary(home: Path, canary: realparts.Canary) -> None:
    audit.record(
        "handed-out", registry=REGISTRY, fingerprint=Secret(canary).fingerprint
    )
    runs = [
        npmguard("audit", cwd=home),
        npmguard("audit", "--json", cwd=home),
        npmguard("audit", "--verify", "--json", cwd=home),
    ]
    assert [run.returncode for run in runs] == [0, 0, 0]
    assert Secret(canary).fingerprint in runs[0].stdout
    for run in runs:
        assert canary not in run.stdout + run.stderr
