"""Measure an idle daemon's memory and CPU against an idle Python interpreter.

Setup as in ``token_latency.py``: a private keychain, a temp HOME with a
secured fake token, and ``npmguard daemon --no-tray`` with its default
settings (watcher, guardian, socket server). One token request is served
first, so the keychain connection and the request path are loaded. After
``--settle`` seconds the script samples, over ``--seconds`` (default 60):

- the daemon's RSS at the end and its CPU time used in the window, as a
  percentage of one core;
- the same for ``python -c "import time; time.sleep(...)"``, the baseline:
  an interpreter doing nothing.

The goals are an RSS under 40 MB and CPU under 0.1%.

    .venv/bin/python bench/idle_daemon.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_latency import REGISTRY, bench_home  # noqa: E402

MB = 1024 * 1024


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=5.0)
    args = parser.parse_args(argv)

    with bench_home() as setup:
        daemon = setup.start_daemon()
        served = setup.npmguard("token", "--registry", REGISTRY)
        if served.stdout.strip() != setup.token:
            raise SystemExit(f"the daemon did not serve the token: {served.stderr}")
        baseline = subprocess.Popen(
            [sys.executable, "-c",
             f"import time; time.sleep({args.settle + args.seconds + 30})"],
            env=setup.env,
        )
        try:
            time.sleep(args.settle)
            processes = {"daemon": psutil.Process(daemon.pid),
                         "python sleeping": psutil.Process(baseline.pid)}
            before = {k: cpu_seconds(p) for k, p in processes.items()}
            started = time.monotonic()
            time.sleep(args.seconds)
            elapsed = time.monotonic() - started
            after = {k: cpu_seconds(p) for k, p in processes.items()}
            rss = {k: p.memory_info().rss / MB for k, p in processes.items()}
            threads = processes["daemon"].num_threads()
        finally:
            baseline.terminate()
            baseline.wait(5)

    print(f"idle for {elapsed:.0f} s after {args.settle:.0f} s to settle")
    for label in processes:
        cpu = (after[label] - before[label]) / elapsed * 100
        print(f"  {label:16} RSS {rss[label]:6.1f} MB   CPU {cpu:.3f}% "
              f"({after[label] - before[label]:.2f} s)")
    print(f"  daemon threads: {threads}")
    ratio = rss["daemon"] / rss["python sleeping"]
    print(f"ratio: daemon RSS = {ratio:.1f}x an idle interpreter's; goal under "
          "40 MB and 0.1% CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
