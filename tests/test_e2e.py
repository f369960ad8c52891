"""The main job end to end, as a user runs it: real npm, pnpm, Verdaccio, keychain.

A user logs in with ``npm adduser``, which writes a token into ``~/.npmrc``.
npmguard reports it, moves it into gnome-keyring, and from then on npm
(through ``npmguard exec``) and pnpm (through the token helper) keep
working with no token left on disk. ``restore`` gives the file back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.npmcli import files_containing, npm_adduser, npmguard, run, write_package

pytestmark = pytest.mark.usefixtures("keyring_bus")

USER = "e2e-alice"
PASSWORD = "e2e-alice-password-1"


def _tool_env(home: Path) -> dict[str, str]:
    """Return the test environment plus the node tools and private pnpm dirs."""
    env = dict(os.environ)
    node_bin = env.get("NPMGUARD_TEST_NODE_BIN")
    if node_bin:
        env["PATH"] = node_bin + os.pathsep + env.get("PATH", "")
    # pnpm answers from its metadata cache without asking the registry, which
    # would hide a missing token; private, fresh dirs avoid that.
    env["npm_config_store_dir"] = str(home / "pnpm-store")
    env["npm_config_cache_dir"] = str(home / "pnpm-cache")
    env["npm_config_update_notifier"] = "false"
    return env


def _token_in(path: Path) -> str:
    match = re.search(r":_authToken=(\S+)", path.read_text())
    assert match, f"no token line in {path}"
    return match.group(1)


def _outputs(*results) -> str:  # type: ignore[no-untyped-def]
    return "".join(r.stdout + r.stderr for r in results)


def test_user_journey_npm_and_pnpm(home: Path, verdaccio, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = _tool_env(home)
    os.environ["PATH"] = env["PATH"]
    registry = verdaccio.url

    # 1. npm adduser writes a plaintext token into ~/.npmrc.
    assert npm_adduser(registry, USER, PASSWORD, "alice@example.com", home) == 0
    npmrc = home / ".npmrc"
    original = npmrc.read_bytes()
    token = _token_in(npmrc)
    assert len(token) > 8

    # 2. scan reports it, by fingerprint only.
    scan = npmguard("scan", "--json", cwd=home, env=env)
    assert scan.returncode == 1, scan.stderr
    report = json.loads(scan.stdout)
    plaintext = [c for c in report["credentials"] if c["state"] == "plaintext"]
    assert len(plaintext) == 1
    assert plaintext[0]["registry"] == verdaccio.nerf
    assert plaintext[0]["kind"] == "_authToken"

    # 3. secure moves it; no file under HOME still holds it.
    secure = npmguard("secure", cwd=home, env=env)
    assert secure.returncode == 0, secure.stderr
    assert files_containing(home, token) == []
    assert "${" not in npmrc.read_text()
    rescan = npmguard("scan", "--json", cwd=home, env=env)
    assert rescan.returncode == 0, rescan.stdout + rescan.stderr

    # 4. npm through exec publishes a private and a public package.
    private = write_package(tmp_path / "private", "@e2e/hello")
    publish = npmguard(
        "exec",
        "--",
        "npm",
        "publish",
        "--registry",
        registry,
        cwd=private,
        env=env,
        timeout=120,
    )
    assert publish.returncode == 0, publish.stderr
    public = write_package(tmp_path / "public", "e2e-public")
    publish_public = npmguard(
        "exec",
        "--",
        "npm",
        "publish",
        "--registry",
        registry,
        cwd=public,
        env=env,
        timeout=120,
    )
    assert publish_public.returncode == 0, publish_public.stderr

    # 5. whoami asks the server, so it proves the token really authenticates.
    whoami = npmguard(
        "exec", "--", "npm", "whoami", "--registry", registry, cwd=home, env=env
    )
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.strip() == USER

    # 6. Without npmguard npm has no token, and public installs still work.
    bare_whoami = run(["npm", "whoami", "--registry", registry], home, env=env)
    assert bare_whoami.returncode != 0
    consumer = write_package(
        tmp_path / "consumer", "consumer", dependencies={"e2e-public": "1.0.0"}
    )
    install = run(
        ["npm", "install", "--registry", registry, "--no-audit", "--no-fund"],
        consumer,
        env=env,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr
    assert (consumer / "node_modules" / "e2e-public" / "package.json").exists()
    private_view = run(
        ["npm", "view", "@e2e/hello", "version", "--registry", registry], home, env=env
    )
    assert private_view.returncode != 0  # the scope needs a login

    # 7. pnpm installs the private package through the token helper alone.
    pnpm_project = write_package(
        tmp_path / "pnpm-project", "pnpm-project", dependencies={"@e2e/hello": "1.0.0"}
    )
    pnpm = run(
        ["pnpm", "install", "--registry", registry], pnpm_project, env=env, timeout=180
    )
    assert pnpm.returncode == 0, pnpm.stdout + pnpm.stderr
    installed = pnpm_project / "node_modules" / "@e2e" / "hello" / "package.json"
    assert installed.exists()

    # 8. The token helper prints the header pnpm sends; token prints the value.
    header = npmguard("token", "--registry", registry, "--header", cwd=home, env=env)
    assert header.returncode == 0, header.stderr
    assert header.stdout.strip() == f"Bearer {token}"

    # 9. restore gives back the file npm wrote, byte for byte.
    restore = npmguard("restore", cwd=home, env=env)
    assert restore.returncode == 0, restore.stderr
    assert npmrc.read_bytes() == original

    outputs = _outputs(
        scan,
        secure,
        rescan,
        publish,
        publish_public,
        whoami,
        bare_whoami,
        install,
        pnpm,
        restore,
    )
    assert token not in outputs
    assert token[-8:] not in outputs
    npmrc.unlink()  # leave no plaintext behind for the canary sweep
    shutil.rmtree(home / ".npm", ignore_errors=True)


def test_project_credential_served_to_pnpm(
    home: Path, verdaccio, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A token pasted into a project .npmrc works for npm and pnpm once secured."""
    env = _tool_env(home)
    registry = verdaccio.url
    token = verdaccio.add_user("e2e-bob", "e2e-bob-password-1")
    owner = write_package(tmp_path / "owner", "@e2e/project-dep")
    owner_npmrc = owner / ".npmrc"
    owner_npmrc.write_text(f"{verdaccio.nerf}:_authToken={token}\n")
    publish = run(
        ["npm", "publish", "--registry", registry], owner, env=env, timeout=120
    )
    assert publish.returncode == 0, publish.stderr
    owner_npmrc.unlink()

    project = write_package(
        tmp_path / "project", "project", dependencies={"@e2e/project-dep": "1.0.0"}
    )
    project_npmrc = project / ".npmrc"
    original = (
        "# team registry\n"
        f"@e2e:registry={registry}\n"
        f"{verdaccio.nerf}:_authToken={token}\n"
    ).encode()
    project_npmrc.write_bytes(original)

    secure = npmguard("secure", str(project), cwd=project, env=env)
    assert secure.returncode == 0, secure.stderr
    assert files_containing(tmp_path, token) == []
    assert files_containing(home, token) == []

    view = npmguard(
        "exec", "--", "npm", "view", "@e2e/project-dep", "version", cwd=project, env=env
    )
    assert view.returncode == 0, view.stderr
    assert view.stdout.strip() == "1.0.0"

    pnpm = run(["pnpm", "install"], project, env=env, timeout=180)
    assert pnpm.returncode == 0, pnpm.stdout + pnpm.stderr

    restore = npmguard("restore", str(project), cwd=project, env=env)
    assert restore.returncode == 0, restore.stderr
    assert project_npmrc.read_bytes() == original
    assert token not in _outputs(secure, view, pnpm, restore)
    project_npmrc.unlink()


def test_exec_fails_closed_when_locked(
    home: Path, verdaccio, keyring_bus, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    env = _tool_env(home)
    token = verdaccio.add_user("e2e-carol", "e2e-carol-password-1")
    (home / ".npmrc").write_text(f"{verdaccio.nerf}:_authToken={token}\n")
    assert npmguard("secure", cwd=home, env=env).returncode == 0

    keyring_bus.lock()
    marker = tmp_path / "ran"
    result = npmguard("exec", "--", "touch", str(marker), cwd=home, env=env)
    assert result.returncode == 2
    assert not marker.exists()
    assert len(result.stderr.strip().splitlines()) == 1
    assert "locked" in result.stderr
    assert "Traceback" not in result.stderr

    helper = npmguard("token", "--registry", verdaccio.url, cwd=home, env=env)
    assert helper.returncode == 2
    assert helper.stdout == ""
