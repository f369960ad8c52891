"""The token lifecycle end to end, as a user runs it on the real Verdaccio.

Log in, and the token goes only to the keychain. Publish through
``npmguard exec`` with a token minted for that one command. Rotate: the old
token is rejected and the new one works. Check the audit trail, which must
fail its check once a record is edited.
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
from tests.npmcli import NPMGUARD, files_containing, npmguard, run, write_package

pytestmark = pytest.mark.usefixtures("keyring_bus")


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    node_bin = env.get("NPMGUARD_TEST_NODE_BIN")
    if node_bin:
        env["PATH"] = node_bin + os.pathsep + env.get("PATH", "")
    env["npm_config_update_notifier"] = "false"
    env["npm_config_cache"] = str(home / "npm-cache")
    return env


def _status(server: realparts.Verdaccio, path: str, token: str) -> int:
    try:
        status, _ = server.request("GET", path, token=token)
    except realparts.HttpError as err:
        return err.status
    return status


def test_lifecycle_journey(home: Path, verdaccio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = _env(home)
    user, password = f"life-{secrets.token_hex(4)}", f"pw-{secrets.token_hex(10)}"
    verdaccio.add_user(user, password)

    # 1. Log in: the token is in the keychain and in no file.
    login = run(
        [*NPMGUARD, "login", "--registry", verdaccio.url, "--username", user,
         "--password-stdin", "--store-password", "--token-helper", "never"],
        home, env=env, stdin=password + "\n",
    )
    assert login.returncode == 0, login.stderr
    (name,) = [n for n, e in load_index().items() if e.get("origin") == "login"]
    from npmguard.vault import open_default_store

    store = open_default_store()
    stored = store.get(name)
    assert stored is not None
    assert files_containing(home, stored.reveal()) == []
    assert files_containing(paths.state_dir(), stored.reveal()) == []
    assert files_containing(tmp_path, password) == []

    # 2. Publish with a token minted for this one command.
    package = write_package(tmp_path / "pkg", f"@life/pkg-{secrets.token_hex(3)}")
    published = npmguard("exec", "--", "npm", "publish", "--registry", verdaccio.url,
                         cwd=package, env=env, timeout=120)
    assert published.returncode == 0, published.stderr
    minted = [r for r in audit.read() if r["event"] == "minted"]
    assert [r["scope"] for r in minted] == ["publish"]
    assert minted[0]["fingerprint"] != stored.fingerprint
    revoked = {r["fingerprint"] for r in audit.read() if r["event"] == "revoked"}
    assert minted[0]["fingerprint"] in revoked
    manifest = json.loads((package / "package.json").read_text())
    packument = manifest["name"].replace("/", "%2f")
    assert _status(verdaccio, packument, stored.reveal()) == 200

    # 3. Rotate: the old token is refused, the new one works.
    rotated = npmguard("rotate", "--registry", verdaccio.url, cwd=home, env=env)
    assert rotated.returncode == 0, rotated.stderr
    new = store.get(name)
    assert new is not None
    assert new != stored
    assert _status(verdaccio, "-/whoami", stored.reveal()) in (401, 403)
    assert _status(verdaccio, packument, stored.reveal()) in (401, 403)
    assert verdaccio.whoami(new.reveal()) == user
    whoami = npmguard("exec", "--read-only", "--", "npm", "whoami", "--registry",
                      verdaccio.url, cwd=home, env=env, timeout=120)
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.strip() == user

    # 4. The audit trail verifies, and fails once a record is edited.
    assert npmguard("audit", "--verify", cwd=home, env=env).returncode == 0
    log_path = audit.audit_path()
    lines = log_path.read_bytes().splitlines(keepends=True)
    edited = json.loads(lines[1])
    edited["registry"] = "//elsewhere.example/"
    lines[1] = json.dumps(edited, separators=(",", ":"), sort_keys=True).encode()
    lines[1] += b"\n"
    log_path.write_bytes(b"".join(lines))
    check = npmguard("audit", "--verify", cwd=home, env=env)
    assert check.returncode == 1
    assert f"{log_path}:2" in check.stdout + check.stderr

    # No token, old, new or minted, reached an output.
    outputs = "".join(r.stdout + r.stderr for r in (login, published, rotated, whoami))
    assert stored.reveal() not in outputs
    assert new.reveal() not in outputs
    assert fingerprint(password) not in outputs
