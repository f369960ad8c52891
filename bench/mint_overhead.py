"""Time what minting adds to a token request and to ``npmguard exec``.

The script starts a private D-Bus bus with an unlocked gnome-keyring and a
Verdaccio on 127.0.0.1 (``tests/realparts.py``), and makes two temp HOMEs
that share them. In ``mint`` the user logged in with ``--store-password``,
so jobs get minted tokens. In ``stored`` the user logged in without it, so
jobs get the stored token. Each HOME runs its own ``npmguard daemon``.

Token helper: a node script named ``pnpm``, run as ``pnpm install`` (so the
daemon classifies its calls as an install's and mints read-only), calls
``python -m npmguard token --header`` ``--calls`` times per round and
times each call. Rounds alternate between the two HOMEs. Printed: median
and p90 per call, and the ratio mint/stored. A ``first call`` case sends
the daemon ``invalidate`` before each round, so that round's first call
mints a new token at Verdaccio while the others are served from the cache.

exec: ``npmguard exec -- true`` with no daemon, alternating between the
HOMEs. ``true`` is unknown to npmguard, so in ``mint`` it mints a publish
token, runs ``true`` as a child and revokes the token. In ``stored`` exec
replaces itself with ``true``. Printed: medians and the ratio.

Everything runs in a temp dir that is deleted at the end. The services are
stopped by PID. Nothing reads the real HOME or talks to the real session bus.

    .venv/bin/python bench/mint_overhead.py [--rounds 10] [--calls 10]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
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

DRIVER = """#!/usr/bin/env node
// Named pnpm and run as `pnpm install`: the daemon classifies its helper
// calls as an install's. Prints the wall time of each call in ms.
const { execFileSync } = require("child_process");
const times = [];
for (let i = 0; i < Number(process.env.BENCH_CALLS); i++) {
  const start = process.hrtime.bigint();
  const out = execFileSync(process.env.BENCH_PYTHON, ["-m", "npmguard", "token",
    "--registry", process.env.BENCH_REGISTRY, "--header"], { encoding: "utf8" });
  times.push(Number(process.hrtime.bigint() - start) / 1e6);
  if (!out.startsWith("Bearer ")) process.exit(3);
}
console.log(JSON.stringify(times));
"""


@dataclass
class Side:
    """One HOME, logged in to the shared Verdaccio, with its own daemon."""

    name: str
    env: dict[str, str]
    daemon: realparts.ManagedProcess | None = None

    @property
    def home(self) -> Path:
        return Path(self.env["HOME"])

    @property
    def socket_path(self) -> str:
        return os.path.join(self.env["XDG_RUNTIME_DIR"], "npmguard", "daemon.sock")

    def npmguard(self, *args: str, stdin: str | None = None
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "npmguard", *args], cwd=self.home, env=self.env,
            input=stdin, capture_output=True, text=True, timeout=120, check=False,
        )

    def ask(self, message: dict[str, object]) -> dict[str, object]:
        from npmguard.daemon.client import request

        return request(message, path=self.socket_path, timeout=10)

    def start_daemon(self, root: Path) -> None:
        proc = realparts.spawn(
            f"npmguard-daemon-{self.name}",
            [sys.executable, "-m", "npmguard", "daemon", "--no-tray"],
            log_path=root / f"daemon-{self.name}.out", env=self.env, cwd=self.home,
        )
        realparts.wait_until(self._answers, timeout=30, what="the daemon's socket",
                             proc=proc)
        self.daemon = proc

    def _answers(self) -> bool:
        from npmguard.daemon.client import DaemonUnavailable

        try:
            return bool(self.ask({"op": "status"}).get("ok"))
        except DaemonUnavailable:
            return False

    def minted_count(self) -> int:
        path = self.home / ".local" / "state" / "npmguard" / "audit.jsonl"
        if not path.exists():
            return 0
        lines = path.read_text().splitlines()
        return sum(json.loads(line).get("event") == "minted" for line in lines)


@contextmanager
def setup(keep: bool) -> Iterator[tuple[realparts.Verdaccio, dict[str, Side], Path]]:
    # Short: the bus and daemon sockets live under it.
    root = Path(tempfile.mkdtemp(prefix="npmguard-mint-"))
    chain = None
    try:
        chain = realparts.start_keychain(root / "keyring")
        server = realparts.start_verdaccio(root / "verdaccio")
        sides: dict[str, Side] = {}
        for name, store_password in (("mint", True), ("stored", False)):
            home = root / name
            env = realparts.isolated_env(home, **chain.env)
            env["NPM_CONFIG_USERCONFIG"] = str(home / ".npmrc")
            env["NPM_CONFIG_GLOBALCONFIG"] = str(root / "global-npmrc")
            side = Side(name, env)
            args = ["login", "--registry", server.url, "--username",
                    f"bench-{name}-{secrets.token_hex(3)}", "--password-stdin",
                    "--token-helper", "never"]
            if store_password:
                args.append("--store-password")
            result = side.npmguard(*args, stdin=secrets.token_hex(8) + "\n")
            if result.returncode != 0:
                raise SystemExit(f"login failed: {result.stderr.strip()}")
            sides[name] = side
        yield server, sides, root
    finally:
        realparts.stop_all()
        if chain is not None:
            chain.stop()
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def helper_calls(side: Side, driver: Path, server: realparts.Verdaccio,
                 calls: int) -> list[float]:
    env = dict(side.env, BENCH_CALLS=str(calls), BENCH_PYTHON=sys.executable,
               BENCH_REGISTRY=server.url)
    result = subprocess.run(["node", str(driver), "install"], cwd=side.home, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the helper driver failed in {side.name}: "
                         f"{result.stderr.strip()[-500:]}")
    return [float(t) for t in json.loads(result.stdout)]


def exec_once(side: Side) -> float:
    env = dict(side.env, NPMGUARD_NO_DAEMON="1")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "npmguard", "exec", "--", "true"],
                            cwd=side.home, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise SystemExit(f"exec failed in {side.name}: {result.stderr.strip()}")
    return elapsed


def summary(label: str, values: list[float]) -> float:
    median = statistics.median(values)
    p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else median
    print(f"  {label:34} {median:7.1f} ms   (p90 {p90:.1f} ms, n={len(values)})")
    return median


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per case")
    parser.add_argument("--calls", type=int, default=10,
                        help="helper calls per round")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)

    with setup(args.keep) as (server, sides, root):
        driver = root / "bin" / "pnpm"
        driver.parent.mkdir()
        driver.write_text(DRIVER)
        driver.chmod(0o700)
        for side in sides.values():
            side.start_daemon(root)

        cached: dict[str, list[float]] = {name: [] for name in sides}
        first: list[float] = []
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, side in sides.items():
                cached[name].append(statistics.median(
                    helper_calls(side, driver, server, args.calls)))
        cached = {name: values[1:] for name, values in cached.items()}
        for _ in range(args.rounds):
            sides["mint"].ask({"op": "invalidate"})
            first.append(helper_calls(sides["mint"], driver, server, 1)[0])
        if sides["mint"].minted_count() < args.rounds or sides["stored"].minted_count():
            raise SystemExit("the mint side did not mint, or the stored side did")

        for side in sides.values():
            if side.daemon is not None:
                side.daemon.stop()
        execs: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds + 1):
            for name, side in sides.items():
                execs[name].append(exec_once(side))
        execs = {name: values[1:] for name, values in execs.items()}

    print(f"token helper through the daemon, {args.rounds} rounds of {args.calls} "
          "calls; median of the per-round medians")
    stored = summary("stored token", cached["stored"])
    minted = summary("minted token, from the cache", cached["mint"])
    fresh = summary("minted token, first call (mints)", first)
    print(f"  ratio cached mint / stored  {minted / stored:5.2f}")
    print(f"  ratio first call / stored   {fresh / stored:5.2f}")
    print(f"npmguard exec -- true, no daemon, {args.rounds} runs each")
    stored_exec = summary("stored token (execvpe)", execs["stored"])
    mint_exec = summary("mint, run, revoke", execs["mint"])
    print(f"  ratio mint / stored         {mint_exec / stored_exec:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
