"""Short-lived tokens minted for one job: real Verdaccio, npm, pnpm and keychain.

Each test logs a fresh user in with ``npmguard login --store-password``. That
stores a real token API token in gnome-keyring on the private bus, with the
password next to it. The test then runs jobs through ``npmguard exec`` or the
token helper and checks at Verdaccio what the job's token may do, and when it
stops working.
A job's token is seen by putting a small recording ``npm`` in front of the
real one on PATH; it writes the token into the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import realparts
from npmcli import NPMGUARD, files_containing, npmguard, run, write_package

from npmguard import audit
from npmguard.config import Settings
from npmguard.daemon import protocol
from npmguard.daemon.client import DaemonUnavailable, request
from npmguard.inject import mint
from npmguard.registry.base import PUBLISH, READ_ONLY
from npmguard.secret import Secret, fingerprint

pytestmark = pytest.mark.usefixtures("keyring_bus")

START_TIMEOUT = 20.0
REAL_NPM = "/usr/bin/npm"


@pytest.fixture(autouse=True)
def _fresh_appender() -> Iterator[None]:
    # In-process audit records keep the log open; each test has its own HOME.
    yield
    audit.close()


# --- helpers -----------------------------------------------------------------


@dataclass
class Account:
    """A Verdaccio user logged in through npmguard, token and password stored."""

    user: str
    password: str
    server: realparts.Verdaccio
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def nerf(self) -> str:
        return self.server.nerf

    @property
    def variable(self) -> str:
        return f"npm_config_{self.nerf}:_authToken"

    def entry(self) -> Any:
        from npmguard.lifecycle import find

        entries = find(self.nerf)
        assert len(entries) == 1, entries
        return entries[0]

    def stored(self) -> str:
        from npmguard.vault import open_default_store

        value = open_default_store().get(self.entry().name)
        assert value is not None
        return value.reveal()


def _tool_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    node_bin = env.get("NPMGUARD_TEST_NODE_BIN")
    if node_bin:
        env["PATH"] = node_bin + os.pathsep + env.get("PATH", "")
    env["npm_config_store_dir"] = str(home / "pnpm-store")
    env["npm_config_cache_dir"] = str(home / "pnpm-cache")
    env["npm_config_update_notifier"] = "false"
    return env


def _login(
    server: realparts.Verdaccio,
    home: Path,
    *,
    store_password: bool = True,
    password: str | None = None,
    helper: str = "never",
) -> Account:
    user = f"mint-{secrets.token_hex(4)}"
    password = password or f"pw-{secrets.token_hex(8)}"
    env = _tool_env(home)
    args = ["login", "--registry", server.url, "--username", user,
            "--password-stdin", "--token-helper", helper]
    if store_password:
        args.append("--store-password")
    result = run([*NPMGUARD, *args], home, env=env, stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    return Account(user, password, server, env)


def _publisher_token(server: realparts.Verdaccio) -> str:
    return server.add_user(f"pub-{secrets.token_hex(4)}", secrets.token_hex(8))


def _publish_dependency(server: realparts.Verdaccio, tmp_path: Path) -> str:
    """Publish a scoped package as another user; return its name."""
    name = f"@mint/dep-{secrets.token_hex(3)}"
    package = write_package(tmp_path / "dep", name)
    env = _tool_env(tmp_path) | {
        f"npm_config_{server.nerf}:_authToken": _publisher_token(server)
    }
    result = run([REAL_NPM, "publish", "--registry", server.url], package, env=env,
                 timeout=120)
    assert result.returncode == 0, result.stderr
    return name


def _recording_npm(tmp_path: Path, account: Account, *, probe: bool = False) -> Path:
    """Put an ``npm`` on PATH that records the job's token, then runs npm.

    With ``probe`` it first tries, with that token, whoami and a publish PUT,
    and records both HTTP statuses: what the job's token may do at once.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "job-token"
    statuses = tmp_path / "job-statuses"
    script = f"""#!{sys.executable}
import json, os, sys, urllib.error, urllib.request
token = os.environ.get({account.variable!r}, "")
with open({str(record)!r}, "w") as fh:
    fh.write(token)
if {probe!r}:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
    def status(method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request({account.url!r} + path, data=data,
                                     method=method)
        req.add_header("Authorization", "Bearer " + token)
        req.add_header("Content-Type", "application/json")
        try:
            return opener.open(req, timeout=10).status
        except urllib.error.HTTPError as err:
            return err.code
    found = {{"whoami": status("GET", "-/whoami"),
             "publish": status("PUT", "@mint%2fprobe", {{"name": "@mint/probe"}})}}
    with open({str(statuses)!r}, "w") as fh:
        json.dump(found, fh)
os.execv({REAL_NPM!r}, [{REAL_NPM!r}, *sys.argv[1:]])
"""
    wrapper = bin_dir / "npm"
    wrapper.write_text(script)
    wrapper.chmod(0o700)
    account.env["PATH"] = str(bin_dir) + os.pathsep + account.env["PATH"]
    return record


def _http_status(server: realparts.Verdaccio, method: str, path: str,
                 token: str) -> int:
    try:
        status, _ = server.request(method, path, token=token)
    except realparts.HttpError as err:
        return err.status
    return status


def _records(event: str) -> list[dict[str, Any]]:
    return [r for r in audit.read() if r.get("event") == event]


def _token_list(account: Account) -> list[dict[str, Any]]:
    _, reply = account.server.request("GET", "-/npm/v1/tokens",
                                      token=account.stored())
    return list(reply["objects"])


def _write_settings(text: str) -> None:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "npmguard" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- the daemon --------------------------------------------------------------


@dataclass
class DaemonProcess:
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() \
            else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _socket_path() -> str:
    return os.path.join(os.environ["XDG_RUNTIME_DIR"], "npmguard", "daemon.sock")


@pytest.fixture
def start_daemon(home: Path, tmp_path: Path) -> Iterator[Callable[[], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start() -> DaemonProcess:
        out = open(tmp_path / f"daemon-{len(started)}.out", "wb")  # noqa: SIM115
        with out:
            popen = subprocess.Popen(
                [*NPMGUARD, "daemon", "--no-tray"], cwd=home, env=_tool_env(home),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        log_path = Path(os.environ["XDG_STATE_HOME"]) / "npmguard" / "npmguard.log"
        proc = DaemonProcess(popen, log_path)
        started.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert popen.poll() is None, f"daemon exited with {popen.returncode}"
            try:
                if request({"op": "status"}, path=_socket_path(), timeout=2)["ok"]:
                    return proc
            except DaemonUnavailable:
                pass
            time.sleep(0.05)
        raise AssertionError("the daemon did not start")

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def _env_request(account: Account, scope: str | None, home: Path) -> dict[str, Any]:
    """Send the request exec sends: the job's variables, minted for ``scope``."""
    message: dict[str, Any] = {
        "op": "env", "registry": None, "cwd": str(home),
        "env": protocol.location_env(account.env), "command": "npm install",
    }
    if scope is not None:
        message["scope"] = scope
    reply = request(message, path=_socket_path())
    assert reply["ok"], reply
    return reply


# --- which scope a job needs ---------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["npm", "install"], ["npm", "ci"], ["npm", "i", "@s/x"], ["npm", "view", "x"],
    ["npm", "whoami"], ["pnpm", "install"], ["pnpm", "add", "x"], ["yarn"],
    ["yarn", "add", "x"], ["bun", "install"], ["npm", "--registry", "u", "install"],
    ["npm", "dist-tag", "ls", "x"], ["node", "/opt/pnpm/bin/pnpm.cjs", "install"],
    ["node", "/usr/lib/node_modules/npm/bin/npm-cli.js", "ci"],
    ["npm install x", "", ""], ["C:\\node\\npm.cmd", "install"],
], ids=lambda argv: " ".join(argv).strip())
def test_scope_read_only(argv: list[str]) -> None:
    assert mint.scope_for_argv(argv) == READ_ONLY


@pytest.mark.parametrize("argv", [
    ["npm", "publish"], ["pnpm", "publish"], ["yarn", "npm", "publish"],
    ["bun", "publish"], ["npm", "dist-tag", "add", "x@1", "next"],
    ["npm", "deprecate", "x", "old"], ["npm", "unpublish", "x"],
    ["npm", "owner", "add", "u", "x"], ["npm", "access", "set", "x"],
    ["npm", "-w", "pkg", "publish"], ["pnpm", "--filter", "a", "publish"],
    ["pnpm", "-r", "publish"], ["npm", "run", "release"], ["npm", "test"],
    ["make"], ["npx", "semantic-release"], ["sh", "-c", "npm install"], [],
], ids=lambda argv: " ".join(argv) or "empty")
def test_scope_publish(argv: list[str]) -> None:
    assert mint.scope_for_argv(argv) == PUBLISH


def test_chain_helper_under_install() -> None:
    chain = [["python3", "-m", "npmguard", "token", "--header"],
             ["node", "/opt/pnpm/bin/pnpm.cjs", "install"], ["bash"]]
    assert mint.scope_for_chain(chain) == READ_ONLY


def test_chain_nearest_tool_wins() -> None:
    chain = [["npmguard", "token"], ["node", "/opt/pnpm", "publish"],
             ["sh", "-c", "pnpm publish"], ["node", "/opt/pnpm", "run", "release"]]
    assert mint.scope_for_chain(chain) == PUBLISH


def test_chain_exec_read_only_forces() -> None:
    chain = [["npmguard", "token"], ["node", "/opt/pnpm", "publish"],
             [sys.executable, "-m", "npmguard", "exec", "--read-only", "--", "pnpm",
              "publish"]]
    assert mint.scope_for_chain(chain) == READ_ONLY


def test_chain_without_tool() -> None:
    assert mint.scope_for_chain([["npmguard", "token"], ["bash"]]) == PUBLISH


def test_ancestors_real_process(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        # Until the child has called exec, /proc shows no command line yet.
        deadline = time.monotonic() + 5
        while mint.ancestors(child.pid, 1)[0].cmdline != ("sleep", "30"):
            assert time.monotonic() < deadline, "the child never ran sleep"
            time.sleep(0.01)
        chain = mint.ancestors(child.pid, 2)
        assert [p.pid for p in chain[:2]] == [child.pid, os.getpid()]
        assert chain[0].cmdline == ("sleep", "30")
    finally:
        child.kill()
        child.wait()


def test_holder_dies_with_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    info = mint.read_process(child.pid)
    assert info is not None
    holder = mint.Holder.of(info)
    assert holder.alive()
    child.kill()
    child.wait()
    assert not holder.alive()


# --- exec without a daemon -----------------------------------------------------


def test_exec_publish_minted(home: Path, verdaccio: Any, tmp_path: Path) -> None:
    account = _login(verdaccio, home)
    record = _recording_npm(tmp_path, account)
    name = f"@mint/pub-{secrets.token_hex(3)}"
    package = write_package(tmp_path / "pkg", name)
    result = npmguard("exec", "--", "npm", "publish", "--registry", account.url,
                      cwd=package, env=account.env, timeout=120)
    assert result.returncode == 0, result.stderr
    used = record.read_text()
    assert used and used != account.stored()
    minted = [r for r in _records("minted") if r["fingerprint"] == fingerprint(used)]
    assert [r["scope"] for r in minted] == [PUBLISH]
    packument = name.replace("/", "%2f")
    assert _http_status(verdaccio, "GET", packument, account.stored()) == 200
    # Revoked the moment exec returned.
    assert _http_status(verdaccio, "GET", "-/whoami", used) == 403


def test_exec_install_read_only(home: Path, verdaccio: Any, tmp_path: Path) -> None:
    dependency = _publish_dependency(verdaccio, tmp_path)
    account = _login(verdaccio, home)
    record = _recording_npm(tmp_path, account, probe=True)
    project = write_package(tmp_path / "project", "project")
    result = npmguard("exec", "--", "npm", "install", dependency, "--registry",
                      account.url, "--no-audit", "--no-fund", cwd=project,
                      env=account.env, timeout=120)
    assert result.returncode == 0, result.stderr
    statuses = json.loads((tmp_path / "job-statuses").read_text())
    assert statuses == {"whoami": 200, "publish": 403}
    assert (project / "node_modules" / dependency / "package.json").exists()
    minted = [r for r in _records("minted")
              if r["fingerprint"] == fingerprint(record.read_text())]
    assert [r["scope"] for r in minted] == [READ_ONLY]


def test_exec_read_only_flag(home: Path, verdaccio: Any, tmp_path: Path) -> None:
    account = _login(verdaccio, home)
    record = _recording_npm(tmp_path, account, probe=True)
    package = write_package(tmp_path / "pkg", f"@mint/ro-{secrets.token_hex(3)}")
    result = npmguard("exec", "--read-only", "--", "npm", "publish", "--registry",
                      account.url, cwd=package, env=account.env, timeout=120)
    assert result.returncode != 0
    assert json.loads((tmp_path / "job-statuses").read_text())["publish"] == 403
    assert record.read_text() != account.stored()


def test_exec_missing_command_mints_nothing(home: Path, verdaccio: Any) -> None:
    account = _login(verdaccio, home)
    result = npmguard("exec", "--", "no-such-command-here", cwd=home,
                      env=account.env)
    assert result.returncode == 127
    assert _records("minted") == []


def test_exec_no_password_stored(home: Path, verdaccio: Any, tmp_path: Path) -> None:
    account = _login(verdaccio, home, store_password=False)
    record = _recording_npm(tmp_path, account)
    result = npmguard("-v", "exec", "--", "npm", "whoami", "--registry",
                      account.url, cwd=home, env=account.env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert record.read_text() == account.stored()
    assert "INFO" in result.stderr
    assert "password and none is stored" in result.stderr


def test_exec_mint_off(home: Path, verdaccio: Any, tmp_path: Path) -> None:
    account = _login(verdaccio, home)
    _write_settings("[tokens]\nmint = false\n")
    record = _recording_npm(tmp_path, account)
    result = npmguard("-v", "exec", "--", "npm", "whoami", "--registry",
                      account.url, cwd=home, env=account.env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert record.read_text() == account.stored()
    assert "mint = false" in result.stderr


def test_exec_sigterm_reaches_child(home: Path, verdaccio: Any,
                                    tmp_path: Path) -> None:
    account = _login(verdaccio, home)
    token_file, ready, got = (tmp_path / n for n in ("token", "ready", "got-term"))
    child = tmp_path / "job.py"
    child.write_text(
        "import os, signal, sys, time\n"
        f"open({str(token_file)!r}, 'w').write(os.environ[{account.variable!r}])\n"
        "def on_term(signum, frame):\n"
        f"    open({str(got)!r}, 'w').write('yes')\n"
        "    sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        f"open({str(ready)!r}, 'w').write('yes')\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([*NPMGUARD, "exec", "--", sys.executable, str(child)],
                            cwd=home, env=account.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        realparts.wait_until(ready.exists, timeout=30, what="the job to start")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 7, stderr
    assert got.read_text() == "yes"
    assert _http_status(verdaccio, "GET", "-/whoami", token_file.read_text()) == 403


def _fake_login(jfrog: Any, home: Path) -> tuple[str, dict[str, str], str]:
    """Store a token for the fake Artifactory; return it, the env, the variable."""
    from npmguard.npmrc.nerf import nerf_dart

    stored = jfrog.add_token("arti")
    env = _tool_env(home)
    result = run([*NPMGUARD, "login", "--registry", jfrog.registry, "--token-stdin",
                  "--token-helper", "never"], home, env=env, stdin=stored + "\n")
    assert result.returncode == 0, result.stderr
    return stored, env, f"npm_config_{nerf_dart(jfrog.registry)}:_authToken"


def test_exec_artifactory_revoked(home: Path, tmp_path: Path) -> None:
    # Artifactory cannot run here: FakeArtifactory is a loopback fake of its
    # Access token API that rejects revoked tokens.
    from fake_artifactory import FakeArtifactory

    with FakeArtifactory() as jfrog:
        stored, env, variable = _fake_login(jfrog, home)
        record = tmp_path / "job-token"
        job = f"import os; open({str(record)!r}, 'w').write(os.environ[{variable!r}])"
        result = npmguard("exec", "--", sys.executable, "-c", job, cwd=home, env=env)
        assert result.returncode == 0, result.stderr
        used = record.read_text()
        assert used != stored
        assert jfrog.record(used).revoked
        assert not jfrog.record(stored).revoked
    assert jfrog.errors == []


def test_exec_artifactory_install_gets_publish(home: Path, tmp_path: Path) -> None:
    # Artifactory makes no read-only user tokens: an install gets a
    # short-lived publish token, which is still better than the stored one.
    from fake_artifactory import FakeArtifactory

    with FakeArtifactory() as jfrog:
        stored, env, variable = _fake_login(jfrog, home)
        result = npmguard("-v", "exec", "--", "npm", "install", "--dry-run", cwd=home,
                          env=env, timeout=120)
        minted = _records("minted")
    assert [r["scope"] for r in minted] == [PUBLISH], result.stderr
    assert "cannot create read-only tokens" in result.stderr


def test_exec_canary_stored_token(home: Path, verdaccio: Any, canary: str,
                                  tmp_path: Path) -> None:
    from npmguard.vault import open_default_store

    account = _login(verdaccio, home)
    store = open_default_store()
    store.set(account.entry().name, Secret(canary))
    check = (f"import os; print('match' if os.environ.get({account.variable!r}) == "
             "os.environ['NPMGUARD_CANARY'] else 'differs')")
    # The registry refuses the canary as a bearer, so minting fails and the
    # stored token is the fallback: the job still runs.
    result = npmguard("-v", "exec", "--", sys.executable, "-c", check, cwd=home,
                      env=account.env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "match"
    assert "could not mint" in result.stderr
    assert [r["fingerprint"] for r in _records("failed")] == [fingerprint(canary)]
    assert canary not in result.stderr
    assert canary[-8:] not in result.stderr
    assert files_containing(Path(os.environ["XDG_STATE_HOME"]), canary) == []


def test_exec_canary_password(home: Path, verdaccio: Any, canary: str,
                              tmp_path: Path) -> None:
    account = _login(verdaccio, home, password=canary)
    record = _recording_npm(tmp_path, account)
    package = write_package(tmp_path / "pkg", f"@mint/cp-{secrets.token_hex(3)}")
    result = npmguard("-vv", "exec", "--", "npm", "publish", "--registry",
                      account.url, cwd=package, env=account.env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert record.read_text() != account.stored()
    assert canary not in result.stdout + result.stderr
    assert files_containing(Path(os.environ["XDG_STATE_HOME"]), canary) == []
    assert files_containing(home, canary) == []


# --- the daemon's cache, in this process ----------------------------------------


def _service(account: Account) -> tuple[mint.MintService, Any]:
    from npmguard.vault import open_default_store

    store = open_default_store()
    service = mint.MintService(Settings(), store)
    plan = service.minter.plan(account.entry().name)
    assert isinstance(plan, mint.Plan), plan
    return service, plan


def _holder(child: subprocess.Popen[bytes]) -> mint.Holder:
    info = mint.read_process(child.pid)
    assert info is not None
    return mint.Holder.of(info)


def test_cache_read_only_shared(home: Path, verdaccio: Any) -> None:
    account = _login(verdaccio, home)
    service, plan = _service(account)
    jobs = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        got = [service.cache.obtain(plan.entry.name, READ_ONLY, _holder(job),
                                    lambda: service.minter.mint(plan, READ_ONLY))
               for job in jobs]
        assert got[0][0] is got[1][0]
        assert [fresh for _, fresh in got] == [True, False]
    finally:
        for job in jobs:
            job.kill()
            job.wait()
        service.clear()


def test_cache_publish_per_job(home: Path, verdaccio: Any) -> None:
    account = _login(verdaccio, home)
    service, plan = _service(account)
    jobs = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        got = [service.cache.obtain(plan.entry.name, PUBLISH, _holder(job),
                                    lambda: service.minter.mint(plan, PUBLISH))[0]
               for job in jobs]
        assert got[0].fingerprint != got[1].fingerprint
    finally:
        for job in jobs:
            job.kill()
            job.wait()
        service.clear()


def test_cache_revokes_when_job_ends(home: Path, verdaccio: Any) -> None:
    account = _login(verdaccio, home)
    service, plan = _service(account)
    job = subprocess.Popen(["sleep", "30"])
    minted, _ = service.cache.obtain(plan.entry.name, PUBLISH, _holder(job),
                                     lambda: service.minter.mint(plan, PUBLISH))
    value = minted.value.reveal()
    service.cache.sweep()
    assert _http_status(verdaccio, "GET", "-/whoami", value) == 200
    job.kill()
    job.wait()
    service.cache.sweep()
    assert _http_status(verdaccio, "GET", "-/whoami", value) == 403
    assert len(service.cache) == 0


def test_cache_clear_revokes(home: Path, verdaccio: Any) -> None:
    account = _login(verdaccio, home)
    service, plan = _service(account)
    job = subprocess.Popen(["sleep", "30"])
    minted, _ = service.cache.obtain(plan.entry.name, READ_ONLY, _holder(job),
                                     lambda: service.minter.mint(plan, READ_ONLY))
    job.kill()
    job.wait()
    assert service.clear() == 1
    assert _http_status(verdaccio, "GET", "-/whoami", minted.value.reveal()) == 403


def test_cache_clear_spares_running_job(home: Path, verdaccio: Any) -> None:
    account = _login(verdaccio, home)
    service, plan = _service(account)
    job = subprocess.Popen(["sleep", "30"])
    minted, _ = service.cache.obtain(plan.entry.name, READ_ONLY, _holder(job),
                                     lambda: service.minter.mint(plan, READ_ONLY))
    value = minted.value.reveal()
    try:
        assert service.clear() == 0
        assert _http_status(verdaccio, "GET", "-/whoami", value) == 200
        again, fresh = service.cache.obtain(
            plan.entry.name, READ_ONLY, _holder(job),
            lambda: service.minter.mint(plan, READ_ONLY))
        assert fresh is True
        assert again.fingerprint != minted.fingerprint
    finally:
        job.kill()
        job.wait()
    service.cache.sweep()
    assert _http_status(verdaccio, "GET", "-/whoami", value) == 403
    service.clear()


def test_service_stops_fast_when_empty(home: Path) -> None:
    service = mint.MintService(Settings(), None)
    service.start()
    started = time.monotonic()
    service.stop()
    assert service.join(1.0)
    assert time.monotonic() - started < 0.2


# --- the daemon, as a process ------------------------------------------------------


def test_daemon_exec_publish_released(
    home: Path, verdaccio: Any, tmp_path: Path,
    start_daemon: Callable[[], DaemonProcess],
) -> None:
    account = _login(verdaccio, home)
    daemon = start_daemon()
    record = _recording_npm(tmp_path, account)
    package = write_package(tmp_path / "pkg", f"@mint/dp-{secrets.token_hex(3)}")
    result = npmguard("exec", "--", "npm", "publish", "--registry", account.url,
                      cwd=package, env=account.env, timeout=120)
    assert result.returncode == 0, result.stderr
    used = record.read_text()
    assert used != account.stored()
    assert _http_status(verdaccio, "GET", "-/whoami", used) == 403
    assert "minted for the job" in daemon.log()


def test_daemon_helper_shares_read_only(
    home: Path, verdaccio: Any, tmp_path: Path,
    start_daemon: Callable[[], DaemonProcess],
) -> None:
    dependency = _publish_dependency(verdaccio, tmp_path)
    account = _login(verdaccio, home, helper="always")
    start_daemon()
    for number in range(2):
        project = write_package(tmp_path / f"project-{number}", f"p{number}",
                                dependencies={dependency: "1.0.0"})
        result = run(["pnpm", "install", "--registry", account.url], project,
                     env=account.env | {"npm_config_store_dir":
                                        str(tmp_path / f"store-{number}")},
                     timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
    minted = _records("minted")
    assert [r["scope"] for r in minted] == [READ_ONLY]
    handed = [r for r in _records("handed-out") if r.get("minted")]
    assert len(handed) >= 2
    assert {r["fingerprint"] for r in handed} == {minted[0]["fingerprint"]}
    assert [t["readonly"] for t in _token_list(account)].count(True) == 1
    reply = request({"op": "invalidate"}, path=_socket_path())
    assert reply["ok"], reply
    assert [t["readonly"] for t in _token_list(account)].count(True) == 0


def test_daemon_stop_revokes(
    home: Path, verdaccio: Any, start_daemon: Callable[[], DaemonProcess],
) -> None:
    account = _login(verdaccio, home)
    daemon = start_daemon()
    reply = _env_request(account, READ_ONLY, home)
    value = reply["variables"][account.variable]
    assert value != account.stored()
    started = time.monotonic()
    daemon.popen.terminate()
    daemon.popen.wait(5)
    assert time.monotonic() - started < 1.5
    assert _http_status(verdaccio, "GET", "-/whoami", value) == 403


def test_daemon_canary_stored_token(
    home: Path, verdaccio: Any, canary: str,
    start_daemon: Callable[[], DaemonProcess],
) -> None:
    from npmguard.vault import open_default_store

    account = _login(verdaccio, home)
    open_default_store().set(account.entry().name, Secret(canary))
    daemon = start_daemon()
    check = (f"import os; print('match' if os.environ.get({account.variable!r}) == "
             "os.environ['NPMGUARD_CANARY'] else 'differs')")
    result = npmguard("exec", "--", sys.executable, "-c", check, cwd=home,
                      env=account.env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "match"
    assert "could not mint" in result.stderr
    assert "could not mint" in daemon.log()
    assert canary not in result.stderr
    assert files_containing(Path(os.environ["XDG_STATE_HOME"]), canary) == []


def test_daemon_env_without_scope(
    home: Path, verdaccio: Any, start_daemon: Callable[[], DaemonProcess],
) -> None:
    account = _login(verdaccio, home)
    start_daemon()
    reply = _env_request(account, None, home)
    assert reply["variables"][account.variable] == account.stored()


def test_daemon_release_bad_lease(
    home: Path, start_daemon: Callable[[], DaemonProcess],
) -> None:
    start_daemon()
    reply = request({"op": "release", "lease": "../x"}, path=_socket_path())
    assert reply == {"ok": False,
                     "error": "invalid request: lease must be 32 hex digits"}


def test_daemon_jwt_expiry(
    home: Path, verdaccio_factory: Any, tmp_path: Path,
    start_daemon: Callable[[], DaemonProcess],
) -> None:
    from npmguard.migrate import PASSWORD_SUFFIX, add_secured
    from npmguard.npmrc.locate import user_config_path
    from npmguard.vault import open_default_store

    server = verdaccio_factory(jwt_expires_in="5s")
    dependency = _publish_dependency(server, tmp_path).replace("/", "%2f")
    start_daemon()
    # Verdaccio's JWT tokens made by its token API cannot create tokens (a
    # Verdaccio bug), so the stored token is a login token, stored the way
    # `npmguard login` stores one. It too lives 5 s: the test mints at once.
    user, password = f"jwt-{secrets.token_hex(4)}", secrets.token_hex(8)
    login_token = server.add_user(user, password)
    add_secured(
        user_config_path(os.environ), f"{server.nerf}:_authToken",
        Secret(login_token), open_default_store(),
        {"origin": "login", "url": server.url, "username": user, "password": True},
        {PASSWORD_SUFFIX: Secret(password)},
    )
    account = Account(user, password, server, _tool_env(home))
    first = _env_request(account, READ_ONLY, home)
    value = first["variables"][account.variable]
    expires = first["minted"][0]["expires"]
    again = _env_request(account, READ_ONLY, home)
    for reply in (first, again):
        request({"op": "release", "lease": reply["lease"]}, path=_socket_path())
    assert again["variables"][account.variable] == value
    assert _http_status(server, "GET", dependency, value) == 200
    # Past expiry less the margin (a tenth of 5 s) the cache serves another.
    time.sleep(max(0.0, expires - 0.1 - time.time()))
    assert time.time() < expires
    late = _env_request(account, READ_ONLY, home)
    assert late["variables"][account.variable] != value
    time.sleep(max(0.0, expires + 1.0 - time.time()))
    assert _http_status(server, "GET", dependency, value) == 401
