"""Send 1000 concurrent ``token`` requests to the daemon; check all are answered.

Setup as in ``token_latency.py``: a private keychain, a temp HOME with a
secured fake token, and ``npmguard daemon --no-tray``. Each client opens its
own connection, so the daemon sees ``--clients`` connections at once. The
script prints how many replies carried the token, the p50 and p99 latency
per request (connect to reply), the wall time for the burst, and, as the
baseline from the same run, the latency of one request at a time.

Two bursts run: one right after the daemon started, whose first requests
read the keychain, and one more once the value is in the daemon's cache.

    .venv/bin/python bench/concurrent_tokens.py [--clients 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_latency import REGISTRY, BenchHome, bench_home  # noqa: E402

from npmguard.daemon import protocol  # noqa: E402


async def one_request(path: str, message: bytes) -> tuple[float, str | None]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(message)
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    reply = json.loads(line)
    return time.perf_counter() - started, reply.get("value")


async def burst(path: str, message: bytes, clients: int
                ) -> tuple[float, list[tuple[float, str | None]]]:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(one_request(path, message) for _ in range(clients)), return_exceptions=True
    )
    wall = time.perf_counter() - started
    answered = [r for r in results if not isinstance(r, BaseException)]
    return wall, answered


async def sequential(path: str, message: bytes, count: int) -> list[float]:
    return [(await one_request(path, message))[0] for _ in range(count)]


def report(label: str, setup: BenchHome, clients: int, wall: float,
           answered: list[tuple[float, str | None]], single: float) -> None:
    latencies = sorted(t for t, _ in answered)
    correct = sum(1 for _, value in answered if value == setup.token)
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000
    print(f"{label}: {correct}/{clients} answered with the token in "
          f"{wall * 1000:.0f} ms ({clients / wall:.0f} requests/s)")
    print(f"  latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
          f"p50 = {p50 / single:.1f}x and p99 = {p99 / single:.1f}x one request "
          "alone")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, args.clients + 256)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    with bench_home() as setup:
        setup.start_daemon()
        path = str(setup.socket_path)
        message = protocol.encode({
            "op": "token", "registry": REGISTRY, "cwd": str(setup.home),
            "env": protocol.location_env(setup.env),
        })
        wall, answered = asyncio.run(burst(path, message, args.clients))
        single_times = asyncio.run(sequential(path, message, 50))
        single = statistics.median(single_times) * 1000
        print(f"one request at a time (cached value): median {single:.2f} ms")
        report("burst on a fresh daemon", setup, args.clients, wall, answered,
               single)
        wall, answered = asyncio.run(burst(path, message, args.clients))
        report("burst with the value cached", setup, args.clients, wall, answered,
               single)
        failed = args.clients - len(answered)
        if failed:
            print(f"{failed} requests got no reply")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
