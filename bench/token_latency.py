"""Time ``npmguard token`` with the daemon running against its baselines.

The script starts a private D-Bus session bus with an unlocked
gnome-keyring (``tests/realparts.py``), makes a temp HOME whose
``~/.npmrc`` holds a fake token, runs ``npmguard secure`` so the token is
in the keychain, and starts ``npmguard daemon --no-tray``. It then runs
each command ``--runs`` times, interleaved, and prints median wall times
and ratios:

- ``python -c pass``: the same interpreter starting and exiting;
- ``npmguard token`` as installed (the console script), served by the daemon;
- the client's fast path alone (``fast_token``, what the CLI calls before
  argparse when ``cli.py`` routes ``token`` to it);
- ``npmguard token`` with ``NPMGUARD_NO_DAEMON=1``: the direct keychain read;
- ``keyring get npmguard NAME``: the keyring package's command line reading
  the same entry from the same keychain.

Everything runs in a temp dir that is deleted at the end; the services are
stopped by PID. Nothing reads the real HOME or talks to the real session bus.

    .venv/bin/python bench/token_latency.py [--runs 40]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import realparts  # noqa: E402

REGISTRY = "http://127.0.0.1:9/"
NERF = "//127.0.0.1:9/"
BIN = Path(sys.executable).parent


def fake_token() -> str:
    alphabet = string.ascii_letters + string.digits
    return "npm_" + "".join(secrets.choice(alphabet) for _ in range(36))


@dataclass
class BenchHome:
    """A temp HOME with a secured token, a keychain, and optionally a daemon."""

    root: Path
    env: dict[str, str]
    chain: realparts.Keychain
    token: str
    daemon: realparts.ManagedProcess | None = None

    @property
    def home(self) -> Path:
        return Path(self.env["HOME"])

    @property
    def socket_path(self) -> Path:
        return Path(self.env["XDG_RUNTIME_DIR"]) / "npmguard" / "daemon.sock"

    def npmguard(self, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "npmguard"), *args], cwd=self.home, env=env or self.env,
            capture_output=True, text=True, timeout=60, check=False,
        )

    def vault_name(self) -> str:
        index = self.home / ".local" / "state" / "npmguard" / "credentials.json"
        names = list(json.loads(index.read_text()))
        if len(names) != 1:
            raise SystemExit(f"expected one secured credential, found {len(names)}")
        return names[0]

    def start_daemon(self) -> realparts.ManagedProcess:
        proc = realparts.spawn(
            "npmguard-daemon", [str(BIN / "npmguard"), "daemon", "--no-tray"],
            log_path=self.root / "daemon.out", env=self.env, cwd=self.home,
        )
        realparts.wait_until(self.daemon_answers, timeout=30,
                             what="the daemon's socket", proc=proc)
        self.daemon = proc
        return proc

    def daemon_answers(self) -> bool:
        from npmguard.daemon.client import DaemonUnavailable, request

        try:
            return bool(request({"op": "status"}, path=str(self.socket_path),
                                timeout=2).get("ok"))
        except DaemonUnavailable:
            return False

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


@contextmanager
def bench_home(*, keep: bool = False) -> Iterator[BenchHome]:
    """Set up keychain, HOME and a secured ~/.npmrc; tear all of it down."""
    # Short: the bus and daemon sockets live under it.
    root = Path(tempfile.mkdtemp(prefix="npmguard-bench-"))
    chain = None
    try:
        chain = realparts.start_keychain(root / "keyring")
        home = root / "home"
        env = realparts.isolated_env(home, **chain.env)
        env["NPM_CONFIG_USERCONFIG"] = str(home / ".npmrc")
        env["NPM_CONFIG_GLOBALCONFIG"] = str(root / "global-npmrc")
        token = fake_token()
        (home / ".npmrc").write_text(f"{NERF}:_authToken={token}\n")
        setup = BenchHome(root, env, chain, token)
        secured = setup.npmguard("secure", "--token-helper", "never")
        if secured.returncode != 0:
            raise SystemExit(f"npmguard secure failed: {secured.stderr.strip()}")
        yield setup
        setup.stop_daemon()
    finally:
        realparts.stop_all()
        if chain is not None:
            chain.stop()
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def time_commands(
    commands: dict[str, tuple[Sequence[str], dict[str, str]]], runs: int,
    cwd: Path, expect: dict[str, str],
) -> dict[str, list[float]]:
    """Run each command ``runs`` times, interleaved; return wall times in seconds."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs + 1):  # the first round warms the page cache
        for name, (argv, env) in commands.items():
            started = time.perf_counter()
            result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True,
                                    text=True, check=False)
            elapsed = time.perf_counter() - started
            if result.returncode != 0:
                raise SystemExit(f"{name} failed: {result.stderr.strip()}")
            if name in expect and result.stdout.strip() != expect[name]:
                raise SystemExit(f"{name} printed something other than the token")
            times[name].append(elapsed)
    return {name: values[1:] for name, values in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="runs per command")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)

    with bench_home(keep=args.keep) as setup:
        name = setup.vault_name()
        setup.start_daemon()
        env = setup.env
        direct_env = dict(env, NPMGUARD_NO_DAEMON="1")
        fast = ("import sys; from npmguard.daemon.client import fast_token; "
                "sys.exit(fast_token(sys.argv[1:]))")
        token_args = ["token", "--registry", REGISTRY]
        commands = {
            "python -c pass": ([sys.executable, "-c", "pass"], env),
            "npmguard token (daemon)": ([str(BIN / "npmguard"), *token_args], env),
            "fast path (daemon)": ([sys.executable, "-c", fast, *token_args], env),
            "npmguard token (no daemon)": (
                [str(BIN / "npmguard"), *token_args], direct_env),
            "keyring get": ([str(BIN / "keyring"), "get", "npmguard", name], env),
        }
        expect = {k: setup.token for k in commands if k != "python -c pass"}
        times = time_commands(commands, args.runs, setup.home, expect)

    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"{args.runs} runs each, interleaved; median wall time per command")
    for label, value in medians.items():
        p90 = statistics.quantiles(times[label], n=10)[-1] * 1000
        print(f"  {label:28} {value:7.1f} ms   (p90 {p90:.1f} ms)")
    base = medians["python -c pass"]
    keyring_cli = medians["keyring get"]
    print("ratios")
    for label in ("npmguard token (daemon)", "fast path (daemon)",
                  "npmguard token (no daemon)"):
        print(f"  {label:28} {medians[label] / base:5.2f}x python -c pass   "
              f"{medians[label] / keyring_cli:5.2f}x keyring get")
    return 0


if __name__ == "__main__":
    sys.exit(main())
