"""The daemon's log: rotating 0600 file, stderr, and redaction of every secret."""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from npmguard import logsetup
from npmguard.errors import NpmguardError
from npmguard.secret import Secret, fingerprint

log = logging.getLogger("npmguard.test")


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """Logging set up as the daemon does it; the root logger is restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    path = tmp_path / "state" / "npmguard.log"
    logsetup.setup_logging("DEBUG", path=path)
    try:
        yield path
    finally:
        logsetup.teardown_logging()
        logsetup.REDACTOR.clear()
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


def _text(path: Path) -> str:
    for handler in logging.getLogger().handlers:
        handler.flush()
    return path.read_text()


def test_file_mode_0600(log_file: Path) -> None:
    log.info("hello")
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_dir_mode_0700(log_file: Path) -> None:
    assert stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700


def test_loose_existing_file_tightened(tmp_path: Path) -> None:
    path = tmp_path / "npmguard.log"
    path.write_text("")
    path.chmod(0o644)
    root = logging.getLogger()
    saved = list(root.handlers)
    logsetup.setup_logging("INFO", path=path, stderr=False)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        logsetup.teardown_logging()
        for handler in saved:
            root.addHandler(handler)


def test_rotated_files_0600(log_file: Path) -> None:
    line = "x" * 1000
    for _ in range(1200):  # a little over 1 MiB
        log.debug(line)
    rotated = log_file.with_name(log_file.name + ".1")
    assert rotated.exists()
    assert stat.S_IMODE(rotated.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_level_from_settings(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved, saved_level = list(root.handlers), root.level
    path = tmp_path / "npmguard.log"
    logsetup.setup_logging("WARNING", path=path, stderr=False)
    try:
        log.info("quiet line")
        log.warning("loud line")
        text = _text(path)
    finally:
        logsetup.teardown_logging()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(saved_level)
    assert "quiet line" not in text
    assert "loud line" in text


def test_canary_pattern_redacted(log_file: Path, canary: str) -> None:
    log.info("read %s from the file", canary)
    text = _text(log_file)
    assert canary not in text
    assert f"<redacted fp={fingerprint(canary)}>" in text


def test_registered_value_redacted(log_file: Path) -> None:
    value = "hunter2-correct-horse"
    logsetup.register_secret(Secret(value))
    log.warning("password is %s", value)
    text = _text(log_file)
    assert value not in text
    assert "<redacted fp=" in text


def test_short_value_not_registered(log_file: Path) -> None:
    logsetup.register_secret("abc")
    log.info("abc is a common word")
    assert "abc is a common word" in _text(log_file)


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("//registry.example/:_authToken=s3cr3t-token-value", "s3cr3t-token-value"),
        ("_auth=dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("//h/:_password=cGFzc3dvcmQxMjM=", "cGFzc3dvcmQxMjM="),
        ("Authorization: Bearer abcdef0123456789", "abcdef0123456789"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ],
    ids=["authToken", "auth", "password", "bearer", "basic"],
)
def test_config_patterns_redacted(log_file: Path, line: str, secret: str) -> None:
    log.info("saw line %s", line)
    text = _text(log_file)
    assert secret not in text
    assert "<redacted fp=" in text


def test_secured_marker_kept(log_file: Path) -> None:
    marker = "; npmguard:3f2a9c1b5d //registry.npmjs.org/:_authToken=<keychain>"
    log.info("%s", marker)
    assert marker in _text(log_file)


def test_exception_text_redacted(log_file: Path, canary: str) -> None:
    try:
        raise ValueError(f"bad value {canary}")
    except ValueError:
        log.exception("parsing failed")
    text = _text(log_file)
    assert canary not in text
    assert "ValueError" in text


def test_stack_info_redacted(log_file: Path, canary: str) -> None:
    record = logging.LogRecord("npmguard.test", logging.INFO, __file__, 1,
                               "with stack", None, None, sinfo=f"Stack: {canary}")
    logging.getLogger().handle(record)
    text = _text(log_file)
    assert "with stack" in text
    assert canary not in text


def test_stderr_redacted(capsys: pytest.CaptureFixture[str], log_file: Path,
                         canary: str) -> None:
    # capsys comes first, so the stderr handler is made on its stream.
    log.error("token %s leaked?", canary)
    captured = capsys.readouterr()
    assert "leaked?" in captured.err
    assert canary not in captured.err


def test_bad_format_args_logged(log_file: Path) -> None:
    log.info("two %s %s", "args-only-one")
    assert "unformattable" in _text(log_file)


def test_previous_handlers_removed(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = list(root.handlers)
    stray = logging.StreamHandler()
    root.addHandler(stray)
    logsetup.setup_logging("INFO", path=tmp_path / "npmguard.log", stderr=False)
    try:
        assert stray not in root.handlers
    finally:
        logsetup.teardown_logging()
        for handler in saved:
            root.addHandler(handler)


def test_every_handler_filtered(log_file: Path) -> None:
    # pytest adds capture handlers of its own to the root logger.
    handlers = [h for h in logging.getLogger().handlers
                if not type(h).__module__.startswith("_pytest")]
    assert len(handlers) == 2
    assert all(
        any(isinstance(f, logsetup.RedactingFilter) for f in h.filters)
        for h in handlers
    )


def test_redactor_limit_bounded() -> None:
    redactor = logsetup.Redactor()
    for index in range(logsetup.MAX_SECRETS + 10):
        redactor.register(f"secret-value-{index:06d}")
    assert redactor.redact("secret-value-000000") == "secret-value-000000"
    assert "<redacted" in redactor.redact(
        f"secret-value-{logsetup.MAX_SECRETS + 9:06d}"
    )


def test_longest_value_wins() -> None:
    redactor = logsetup.Redactor()
    redactor.register("abcdefgh")
    redactor.register("abcdefgh-and-more")
    assert redactor.redact("abcdefgh-and-more") == (
        f"<redacted fp={fingerprint('abcdefgh-and-more')}>"
    )


def test_unwritable_dir_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NpmguardError) as caught:
        logsetup.setup_logging("INFO", path=blocker / "npmguard.log")
    assert "cannot open the log file" in str(caught.value)
    assert "\n" not in str(caught.value)
