"""``npmguard login`` and ``npmguard rotate`` against the real Verdaccio and keychain.

Login must leave no token in any file. Rotation must leave the new token
in use and the old one rejected by the registry. A failure before the swap
must leave the old token in force.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
import realparts

from npmguard import audit, paths
from npmguard.migrate import load_index
from npmguard.secret import fingerprint
from tests.npmcli import files_containing, npmguard, on_terminal

pytestmark = pytest.mark.usefixtures("keyring_bus")


def _user() -> tuple[str, str]:
    return f"lr-{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"


def _login(
    verdaccio: realparts.Verdaccio, home: Path, *extra: str, password: str | None = None
) -> tuple[str, str]:
    user, pw = _user()
    verdaccio.add_user(user, pw)
    result = _run_login(verdaccio, home, user, password or pw, *extra)
    assert result.returncode == 0, result.stderr
    return user, pw


def _run_login(verdaccio, home, user, password, *extra):  # type: ignore[no-untyped-def]
    from tests.npmcli import NPMGUARD, run

    return run(
        [*NPMGUARD, "login", "--registry", verdaccio.url, "--username", user,
         "--password-stdin", "--token-helper", "never", *extra],
        home, stdin=password + "\n",
    )


def _stored_token(verdaccio: realparts.Verdaccio, home: Path) -> str:
    result = npmguard("token", "--registry", verdaccio.url, cwd=home)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _refused(verdaccio: realparts.Verdaccio, token: str) -> bool:
    try:
        return verdaccio.whoami(token) is None
    except realparts.HttpError as err:
        return err.status in (401, 403)


def test_login_writes_no_token(home: Path, verdaccio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    user, _ = _login(verdaccio, home)
    token = _stored_token(verdaccio, home)

    assert verdaccio.whoami(token) == user
    assert files_containing(home, token) == []
    assert files_containing(paths.state_dir(), token) == []
    assert "; npmguard:" in (home / ".npmrc").read_text()


def test_login_token_is_revocable(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    user, pw = _login(verdaccio, home)
    token = _stored_token(verdaccio, home)

    _, listing = verdaccio.request("GET", "-/npm/v1/tokens", token=token)
    masks = [entry["token"] for entry in listing["objects"]]
    assert any(m.startswith(token[:5]) and m.endswith(token[-5:]) for m in masks)


def test_login_index_entry(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    user, _ = _login(verdaccio, home)

    entries = [e for e in load_index().values() if e.get("origin") == "login"]
    assert len(entries) == 1
    assert entries[0]["username"] == user
    assert entries[0]["provider"] == "npm-token-api"
    assert entries[0]["url"] == verdaccio.url
    assert "password" not in entries[0]


def test_login_wrong_password(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    user, pw = _user()
    verdaccio.add_user(user, pw)

    result = _run_login(verdaccio, home, user, "not-" + pw)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (home / ".npmrc").exists()


def test_login_no_terminal_needs_username(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    result = npmguard("login", "--registry", verdaccio.url, "--legacy", cwd=home)

    assert result.returncode == 2
    assert "--password-stdin" in result.stderr


def test_login_replaces_plaintext_line(home: Path, verdaccio, canary) -> None:  # type: ignore[no-untyped-def]
    npmrc = home / ".npmrc"
    npmrc.write_text(f"color=false\n{verdaccio.nerf}:_authToken={canary}\n")

    _login(verdaccio, home)

    text = npmrc.read_text()
    assert canary not in text
    assert "color=false" in text


def test_rotate_revokes_old_token(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    user, _ = _login(verdaccio, home, "--store-password")
    old = _stored_token(verdaccio, home)

    result = npmguard("rotate", "--registry", verdaccio.url, cwd=home)

    assert result.returncode == 0, result.stderr
    new = _stored_token(verdaccio, home)
    assert new != old
    assert verdaccio.whoami(new) == user
    assert _refused(verdaccio, old)


def test_rotate_audit_verifies(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    _login(verdaccio, home, "--store-password")
    assert npmguard("rotate", "--registry", verdaccio.url, cwd=home).returncode == 0

    events = [r["event"] for r in audit.read()]
    assert events[:1] == ["login"]
    assert {"minted", "rotated", "revoked"} <= set(events)
    assert npmguard("audit", "--verify", cwd=home).returncode == 0


def test_rotate_cleans_up(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    _login(verdaccio, home, "--store-password")
    assert npmguard("rotate", "--registry", verdaccio.url, cwd=home).returncode == 0

    from npmguard.rotation import pending_rotations
    from npmguard.vault import open_default_store

    store = open_default_store()
    (name,) = [n for n, e in load_index().items() if e.get("origin") == "login"]
    assert pending_rotations() == []
    assert store.get(name + "#next") is None
    assert store.get(name + "#old") is None
    assert load_index()[name].get("rotated")


def test_rotate_needs_password(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    user, _ = _login(verdaccio, home)
    old = _stored_token(verdaccio, home)

    result = npmguard("rotate", "--registry", verdaccio.url, cwd=home)

    assert result.returncode == 2
    assert "password" in result.stderr
    assert "Traceback" not in result.stderr
    assert _stored_token(verdaccio, home) == old
    assert verdaccio.whoami(old) == user


def test_rotate_registry_down(home: Path, verdaccio_factory) -> None:  # type: ignore[no-untyped-def]
    server = verdaccio_factory()
    _login(server, home, "--store-password")
    from npmguard.vault import open_default_store

    (name,) = [n for n, e in load_index().items() if e.get("origin") == "login"]
    old = open_default_store().get(name)
    server.stop()

    result = npmguard("rotate", "--registry", server.url, cwd=home)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert open_default_store().get(name) == old
    from npmguard.rotation import pending_rotations

    assert pending_rotations() == []


def test_rotate_unknown_registry(home: Path) -> None:
    result = npmguard("rotate", "--registry", "https://nowhere.invalid/", cwd=home)

    assert result.returncode == 2
    assert "no stored token" in result.stderr


def test_rotate_json_output(home: Path, verdaccio, canary) -> None:  # type: ignore[no-untyped-def]
    _login(verdaccio, home, "--store-password")
    old = _stored_token(verdaccio, home)

    result = npmguard("rotate", "--json", cwd=home)

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rotations"][0]["ok"] is True
    new = _stored_token(verdaccio, home)
    assert old not in result.stdout
    assert new not in result.stdout


def test_rotate_exposed_git(home: Path, verdaccio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    user, pw = _user()
    token = verdaccio.add_user(user, pw)
    project = home / "proj"
    project.mkdir()
    (project / "package.json").write_text('{"name": "p", "version": "1.0.0"}\n')
    npmrc = project / ".npmrc"
    npmrc.write_text(f"{verdaccio.nerf}:_authToken={token}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", ".npmrc"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=project, check=True)
    assert npmguard("secure", "--token-helper", "never", cwd=project).returncode == 0

    result = npmguard("rotate", "--exposed", "--registry", verdaccio.url, cwd=project)

    # A token from a plain npm login cannot be rotated without the password
    # and cannot be revoked; the command names the exposure and fails.
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert os.path.exists(npmrc)


def test_rotate_exposed_plaintext(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    user, _ = _login(verdaccio, home, "--store-password")
    old = _stored_token(verdaccio, home)
    project = home / "leaky"
    project.mkdir()
    (project / "package.json").write_text('{"name": "leaky", "version": "1.0.0"}\n')
    (project / ".npmrc").write_text(f"{verdaccio.nerf}:_authToken={old}\n")

    result = npmguard("rotate", "--exposed", cwd=project)

    assert result.returncode == 0, result.stderr
    assert "in plaintext at ~/leaky/.npmrc:1" in result.stdout
    assert _refused(verdaccio, old)
    assert verdaccio.whoami(_stored_token(verdaccio, home)) == user


def test_rotate_exposed_none(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    _login(verdaccio, home, "--store-password")
    old = _stored_token(verdaccio, home)

    result = npmguard("rotate", "--exposed", cwd=home)

    assert result.returncode == 0, result.stderr
    assert "no stored token is known to be exposed" in result.stdout
    assert _stored_token(verdaccio, home) == old


def test_login_promptson_terminal(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    from tests.npmcli import NPMGUARD

    user, pw = _user()
    verdaccio.add_user(user, pw)

    code, transcript = on_terminal(
        [*NPMGUARD, "login", "--registry", verdaccio.url, "--token-helper", "never"],
        home,
        [(b"Username: ", f"{user}\r".encode()), (b"Password: ", f"{pw}\r".encode())],
    )

    assert code == 0, transcript.decode(errors="replace")
    assert b"has no web login" in transcript
    assert pw.encode() not in transcript
    assert verdaccio.whoami(_stored_token(verdaccio, home)) == user


def test_rotate_asks_password(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    from tests.npmcli import NPMGUARD

    user, pw = _login(verdaccio, home)
    old = _stored_token(verdaccio, home)

    code, transcript = on_terminal(
        [*NPMGUARD, "rotate", "--registry", verdaccio.url], home,
        [(b"(not stored): ", f"{pw}\r".encode())],
    )

    assert code == 0, transcript.decode(errors="replace")
    assert _refused(verdaccio, old)
    assert verdaccio.whoami(_stored_token(verdaccio, home)) == user
    assert "password" not in load_index()[
        next(n for n, e in load_index().items() if e.get("origin") == "login")
    ]


def test_rotate_updates_copies(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    from npmguard.vault import open_default_store

    user, _ = _login(verdaccio, home, "--store-password")
    old = _stored_token(verdaccio, home)
    project = home / "copy"
    project.mkdir()
    (project / "package.json").write_text('{"name": "copy", "version": "1.0.0"}\n')
    (project / ".npmrc").write_text(f"{verdaccio.nerf}:_authToken={old}\n")
    assert npmguard("secure", "--token-helper", "never", cwd=project).returncode == 0
    assert len(load_index()) == 2

    result = npmguard("rotate", cwd=home)

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("rotated the token") == 1
    store = open_default_store()
    values = {store.get(name) for name in load_index()}
    assert len(values) == 1
    (new,) = values
    assert new is not None
    assert verdaccio.whoami(new.reveal()) == user
    assert _refused(verdaccio, old)
    assert {e["fingerprint"] for e in load_index().values()} == {new.fingerprint}


def test_secure_and_restore_audited(home: Path, verdaccio, canary) -> None:  # type: ignore[no-untyped-def]
    (home / ".npmrc").write_text(f"{verdaccio.nerf}:_authToken={canary}\n")

    secured = npmguard("secure", "--token-helper", "never", cwd=home)
    restored = npmguard("restore", cwd=home)

    assert secured.returncode == 0, secured.stderr
    assert restored.returncode == 0, restored.stderr
    assert "WARNING" not in secured.stderr + restored.stderr
    events = [r["event"] for r in audit.read()]
    assert events == ["secured", "restored"]


def test_exposed_skips_login_token(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    _login(verdaccio, home, "--store-password")
    old = _stored_token(verdaccio, home)
    (home / ".npmrc").chmod(0o644)

    result = npmguard("rotate", "--exposed", cwd=home)

    assert result.returncode == 0, result.stderr
    assert "no stored token is known to be exposed" in result.stdout
    assert _stored_token(verdaccio, home) == old


def test_relogin_revokes_earlier(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    user, pw = _login(verdaccio, home)
    first = _stored_token(verdaccio, home)

    again = _run_login(verdaccio, home, user, pw)

    assert again.returncode == 0, again.stderr
    assert "revoked 1 token(s)" in again.stdout
    assert _refused(verdaccio, first)
    assert verdaccio.whoami(_stored_token(verdaccio, home)) == user
    assert len(load_index()) == 1


def test_login_failed_store_revokes(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    user, pw = _user()
    session = verdaccio.add_user(user, pw)
    npmrc = home / ".npmrc"
    npmrc.write_text("color=false\n")
    npmrc.chmod(0o444)

    result = _run_login(verdaccio, home, user, pw)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    _, listing = verdaccio.request("GET", "-/npm/v1/tokens", token=session)
    assert listing["objects"] == []
    assert load_index() == {}


def test_login_stdin_not_utf8(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from tests.npmcli import NPMGUARD

    result = subprocess.run(
        [*NPMGUARD, "login", "--registry", verdaccio.url, "--username", "u",
         "--password-stdin"],
        cwd=home, input=b"\xff\xfe\xfa\n", capture_output=True, timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert b"not UTF-8" in result.stderr
    assert b"Traceback" not in result.stderr


def test_token_direct_audited(home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    _login(verdaccio, home)
    token = _stored_token(verdaccio, home)

    events = [r for r in audit.read() if r["event"] == "handed-out"]

    assert [r["fingerprint"] for r in events][-1:] == [
        fingerprint(token)
    ]


def test_due_when_expiring() -> None:
    import time

    from npmguard.lifecycle import Managed
    from npmguard.rotation import due, next_rotation

    now = time.time()
    fresh = Managed("a", {"issued": now - 10, "expires": now + 1000})
    ending = Managed("b", {"issued": now - 900, "expires": now + 100})

    chosen = due([fresh, ending], lambda entry: 0.0, now)

    assert [e.name for e in chosen] == ["b"]
    assert next_rotation(fresh, 0.0) == pytest.approx(now + 1000 - 0.2 * 1010)


def test_exec_registry_without_credential(home: Path) -> None:
    result = npmguard("exec", "--registry", "http://127.0.0.1:9/", "--", "true",
                      cwd=home)

    assert result.returncode == 2
    assert "no credential for //127.0.0.1:9/" in result.stderr


def test_exec_registry_plaintext_runs(home: Path, canary) -> None:  # type: ignore[no-untyped-def]
    (home / ".npmrc").write_text(f"//127.0.0.1:9/:_authToken={canary}\n")

    result = npmguard("exec", "--registry", "http://127.0.0.1:9/", "--", "true",
                      cwd=home)

    assert result.returncode == 0, result.stderr
