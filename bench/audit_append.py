"""Time ``npmguard.audit.record`` against a plain ``os.write`` append.

Each round appends N records with ``audit.record`` (a token hand-out as the
daemon logs it) and N lines of the same length with ``os.write`` on an
``O_APPEND`` descriptor, in the same temp dir. It prints the median over
the rounds of the microseconds per record and the ratio to the plain
append:

- ``os.write``: the baseline;
- ``record``: descriptors open and the chain end cached, the daemon's case;
- ``record, reopened``: ``audit.close()`` before each record, so each one
  opens the files, reads the tail and checks the head, as the first record
  of a CLI process does;
- with ``--fsync``: also ``os.write`` + ``os.fsync`` and ``record`` with
  ``audit.FSYNC = True``.

Everything is written under a temp dir that is deleted at the end
(``NPMGUARD_STATE_DIR`` points there); nothing else is touched.

    .venv/bin/python bench/audit_append.py [--records 2000] [--rounds 5] [--fsync]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

FIELDS: dict[str, object] = {
    "registry": "//registry.npmjs.org/",
    "kind": "_authToken",
    "fingerprint": "2b7f0c4e91aa",
    "peer": {"pid": 48213, "exe": "node", "parents": ["npm", "bash", "tmux"]},
    "command": "npm publish",
    "source": "/home/user/.npmrc",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000, metavar="N")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--fsync", action="store_true", help="also time appends that fsync"
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="npmguard-audit-bench-"))
    try:
        return _run(workdir, args.records, args.rounds, args.fsync)
    finally:
        from npmguard import audit

        audit.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, count: int, rounds: int, with_fsync: bool) -> int:
    os.environ["NPMGUARD_STATE_DIR"] = str(workdir / "state")
    from npmguard import audit

    audit.record("handed-out", **FIELDS)
    line_length = len(audit.audit_path().read_bytes())
    line = b"x" * (line_length - 1) + b"\n"
    plain_path = workdir / "plain.log"

    def plain(sync: bool) -> Callable[[], None]:
        def append() -> None:
            fd = os.open(plain_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                for _ in range(count):
                    os.write(fd, line)
                    if sync:
                        os.fsync(fd)
            finally:
                os.close(fd)

        return append

    def recorded(sync: bool, reopen: bool) -> Callable[[], None]:
        def append() -> None:
            audit.FSYNC = sync
            try:
                for _ in range(count):
                    if reopen:
                        audit.close()
                    audit.record("handed-out", **FIELDS)
            finally:
                audit.FSYNC = False

        return append

    cases: dict[str, Callable[[], None]] = {
        "os.write": plain(False),
        "record": recorded(False, reopen=False),
        "record, reopened": recorded(False, reopen=True),
    }
    if with_fsync:
        cases["os.write + fsync"] = plain(True)
        cases["record, FSYNC"] = recorded(True, reopen=False)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        # Interleaved, so that load on the machine hits every case alike.
        for name, append in cases.items():
            start = time.perf_counter()
            append()
            times[name].append(time.perf_counter() - start)

    result = audit.verify()
    print(
        f"{count} appends x {rounds} rounds, {line_length} bytes per line; "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    per_record = {
        name: statistics.median(values) / count * 1e6 for name, values in times.items()
    }
    synced_base = per_record.get("os.write + fsync")
    print(f"{'case':<20} {'us/record':>10} {'/ os.write':>11} {'/ write+fsync':>14}")
    for name, micros in per_record.items():
        to_synced = ""
        if synced_base is not None and "FSYNC" in name:
            to_synced = f"{micros / synced_base:.2f}"
        ratio = micros / per_record["os.write"]
        print(f"{name:<20} {micros:>10.1f} {ratio:>11.1f} {to_synced:>14}")
    print(f"chain check after the run: {'intact' if result.ok else 'BROKEN'}, "
          f"{result.count} records")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
