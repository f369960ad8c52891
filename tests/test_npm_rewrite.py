"""npm's own config writer drops comments; restore must still find the tokens.

``npm config set`` and ``npm login`` re-encode the whole user config, which
removes npmguard's marker comments (the token is then only in the vault)
and keeps the ``tokenHelper`` lines.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.npmcli import npmguard, run

pytestmark = pytest.mark.usefixtures("keyring_bus")

REGISTRY = "//npm.example.test/"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    node_bin = env.get("NPMGUARD_TEST_NODE_BIN")
    if node_bin:
        env["PATH"] = node_bin + os.pathsep + env.get("PATH", "")
    return env


def test_restore_after_npm_config_set(home: Path, canary: str) -> None:
    env = _env()
    npmrc = home / ".npmrc"
    npmrc.write_text(f"{REGISTRY}:_authToken={canary}\n")
    secure = npmguard("secure", "--token-helper", "always", cwd=home, env=env)
    assert secure.returncode == 0, secure.stderr

    config_set = run(
        ["npm", "config", "set", "fund=false", "--location=user"], home, env=env
    )
    assert config_set.returncode == 0, config_set.stderr
    rewritten = npmrc.read_text()
    assert "; npmguard:" not in rewritten  # npm dropped the marker comments
    assert canary not in rewritten

    restore = npmguard("restore", cwd=home, env=env)
    assert restore.returncode == 0, restore.stderr
    restored = npmrc.read_text()
    assert f"{REGISTRY}:_authToken={canary}" in restored.splitlines()
    assert "fund=false" in restored.splitlines()
    assert "tokenHelper" not in restored
    assert canary not in restore.stdout + restore.stderr

    scan = npmguard("scan", "--json", cwd=home, env=env)
    assert scan.returncode == 1
    npmrc.unlink()


def test_restore_keeps_entry_when_key_reset(home: Path, canary: str) -> None:
    env = _env()
    npmrc = home / ".npmrc"
    npmrc.write_text(f"{REGISTRY}:_authToken={canary}\n")
    assert npmguard("secure", "--token-helper", "never", cwd=home,
                    env=env).returncode == 0
    npmrc.write_text(f"{REGISTRY}:_authToken=${{OTHER_TOKEN}}\n")

    restore = npmguard("restore", cwd=home, env=env)
    assert restore.returncode == 0, restore.stderr
    assert "is kept" in restore.stderr
    assert npmrc.read_text() == f"{REGISTRY}:_authToken=${{OTHER_TOKEN}}\n"


def test_url_password_reported_not_moved(home: Path, canary: str) -> None:
    env = _env()
    npmrc = home / ".npmrc"
    original = f"registry=https://bob:{canary}@npm.example.test/\n"
    npmrc.write_text(original)

    scan = npmguard("scan", "--json", cwd=home, env=env)
    assert scan.returncode == 1
    assert canary not in scan.stdout + scan.stderr
    assert '"kind": "url-password"' in scan.stdout

    secure = npmguard("secure", cwd=home, env=env)
    assert "password inside the registry URL" in secure.stderr
    assert canary not in secure.stdout + secure.stderr
    assert npmrc.read_text() == original
    npmrc.unlink()
