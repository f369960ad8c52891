"""``npmguard exec -- CMD``: run CMD with registry credentials in its environment.

The credentials go into the child's environment as npm's own
``npm_config_//host/:_authToken`` settings, never into argv. If any needed
value cannot be read, the command is not started.

Where the registry can mint tokens, CMD gets a token minted for this job
instead of the stored one (see ``npmguard.inject.mint``): read-only for
installs and other reads, with publish rights for publishing commands and
anything unknown. ``--read-only`` forces read-only. Then exec cannot
replace itself with CMD: it runs CMD as a child, passes SIGINT, SIGTERM
and SIGHUP on to it, and revokes the minted token when CMD ends (through
the daemon, or itself when no daemon runs). It exits with CMD's code, or
128 + the signal that ended CMD. With nothing minted, exec replaces itself
with CMD as before.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npmguard.errors import NpmguardError, UsageError

log = logging.getLogger(__name__)

# The signals a terminal, a CI runner or a service manager sends to stop a
# job. exec passes them on to the child it waits for.
FORWARDED = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
    if hasattr(signal, name)
)


@dataclass
class _Job:
    """The variables for the child, and what to revoke when it ends."""

    variables: dict[str, str]
    lease: str | None = None  # the daemon's handle for its minted tokens
    minted: list[Any] = field(default_factory=list)  # minted here, no daemon

    @property
    def has_minted(self) -> bool:
        return bool(self.lease or self.minted)

    def finish(self) -> None:
        """Revoke what was minted for the job, or tell the daemon it ended."""
        if self.lease is not None:
            _release(self.lease)
        if self.minted:
            from npmguard.inject.mint import revoke

            for minted in self.minted:
                revoke(minted, "the job ended")


def run(args: argparse.Namespace) -> int:
    from npmguard.inject.mint import job_command, scope_for_argv
    from npmguard.registry.base import READ_ONLY

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(
            "no command given; usage: npmguard exec [--registry URL] [--read-only] "
            "-- CMD ..."
        )
    missing = _missing_command(argv[0])
    if missing is not None:
        return missing

    scope = READ_ONLY if args.read_only else scope_for_argv(argv)
    command = job_command(argv)
    with StopSignals() as signals:
        job = _job_from_daemon(args.registry, scope, command)
        if job is None:
            job = _job_direct(args.registry, scope, command)

        if args.registry and not job.variables:
            _require_credential(args.registry)
        env = dict(os.environ)
        env.update(job.variables)
        if not job.has_minted:
            return _replace_process(argv, env)
        try:
            return signals.run_child(argv, env)
        finally:
            job.finish()


def _require_credential(registry: str) -> None:
    """Fail when npm would send no credential at all to ``registry``.

    ``--registry`` requests that registry's credential. Running the command
    without one would fail later, with a less clear message from npm. A
    plaintext or environment-referenced credential is npm's own to send,
    so only a registry with nothing configured is an error.
    """
    from npmguard.inject.resolve import Effective
    from npmguard.npmrc.nerf import InvalidRegistryError, nerf_dart

    try:
        nerf = nerf_dart(registry)
    except InvalidRegistryError as err:
        raise UsageError(f"--registry: {err}") from None
    if not Effective(os.environ, Path.cwd()).lookup(registry):
        raise NpmguardError(
            f"no credential for {nerf} in the npm config files read from "
            f"{Path.cwd()}; run `npmguard scan` to see what is configured"
        )


def _missing_command(program: str) -> int | None:
    """Return 127 or 126 when ``program`` cannot run, before any token is minted."""
    if shutil.which(program) is not None:
        return None
    if os.sep in program and os.path.exists(program):
        print(f"npmguard: permission denied: {program}", file=sys.stderr)
        return 126
    print(f"npmguard: command not found: {program}", file=sys.stderr)
    return 127


def _replace_process(argv: list[str], env: dict[str, str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        try:
            os.execvpe(argv[0], argv, env)
        except FileNotFoundError:
            print(f"npmguard: command not found: {argv[0]}", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"npmguard: permission denied: {argv[0]}", file=sys.stderr)
            return 126
    try:
        return subprocess.call(argv, env=env)
    except FileNotFoundError:
        print(f"npmguard: command not found: {argv[0]}", file=sys.stderr)
        return 127


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP handling while exec works on a minted token.

    Before the child starts, a signal stops exec as it would anyway
    (KeyboardInterrupt for SIGINT, exit 128 + the signal otherwise), so
    that tokens minted so far are revoked on the way out. While the child
    runs, each signal is passed on to it. After it exits, signals are only
    noted, so that they cannot cut the revocation short.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in FORWARDED:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        child = self.child
        if child is None:
            if signum == getattr(signal, "SIGINT", None):
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received.append(signum)
        if child.returncode is not None:
            return
        # Ctrl-C in a terminal reaches every process of the foreground
        # group, the child included. Sending it again would count twice
        # for tools that treat a second SIGINT as "stop now".
        if signum == getattr(signal, "SIGINT", None) and _terminal_sent_it():
            return
        # Popen ignores the call once the child is reaped, so the pid
        # cannot be another process's by then.
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    def run_child(self, argv: list[str], env: dict[str, str]) -> int:
        """Run ``argv`` as a child, pass stop signals on; return its exit code.

        A child ended by a signal gives 128 + the signal's number, as a
        shell reports it.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            self.child = subprocess.Popen(argv, env=env)
        except FileNotFoundError:
            print(f"npmguard: command not found: {argv[0]}", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"npmguard: permission denied: {argv[0]}", file=sys.stderr)
            return 126
        code = self.child.wait()
        return 128 - code if code < 0 else code


def _terminal_sent_it() -> bool:
    """True when this process group is in the foreground of the stdin terminal."""
    try:
        fd = sys.stdin.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (AttributeError, OSError, ValueError):
        return False


def _job_from_daemon(registry: str | None, scope: str, command: str) -> _Job | None:
    """Return what the daemon hands out, or None when none is running."""
    from npmguard.daemon import client

    message = client.credential_request("env", registry)
    message.update(scope=scope, command=command)
    reply = client.ask(message)
    if reply is None:
        return None
    if not reply.get("ok"):
        raise DaemonError(client.reply_error(reply))
    for warning in reply.get("warnings") or []:
        print(f"npmguard: {warning}", file=sys.stderr)
    for note in reply.get("notes") or []:
        log.info("%s", note)
    variables = reply.get("variables") or {}
    lease = reply.get("lease")
    for minted in reply.get("minted") or []:
        if isinstance(minted, dict):
            log.info("using a %s token minted for this job for %s (fingerprint %s)",
                     minted.get("scope"), minted.get("registry"),
                     minted.get("fingerprint"))
    return _Job(
        {str(k): str(v) for k, v in variables.items()},
        lease=lease if isinstance(lease, str) else None,
    )


def _release(lease: str) -> None:
    from npmguard.daemon import client

    reply = client.ask({"op": "release", "lease": lease})
    if reply is None or not reply.get("ok"):
        reason = "no reply" if reply is None else client.reply_error(reply)
        print(f"npmguard: the daemon did not confirm the job's end ({reason}); it "
              "revokes the minted token once it sees this process has ended",
              file=sys.stderr)


def _job_direct(registry: str | None, scope: str, command: str) -> _Job:
    """Resolve the variables in this process, reading the vault directly."""
    from npmguard.inject.resolve import Effective, exec_environment
    from npmguard.migrate import pending_journal, recover
    from npmguard.vault import open_default_store

    effective = Effective(os.environ, Path.cwd())
    for error in effective.errors:
        print(f"npmguard: {error}", file=sys.stderr)
    if not (effective.secured() or pending_journal()):
        return _Job({})
    store = open_default_store()
    if pending_journal():
        recover(lambda: store)
        effective = Effective(os.environ, Path.cwd())
    variables = exec_environment(effective, store, registry)
    if not variables:
        return _Job({})
    from npmguard.config import load_settings
    from npmguard.inject.mint import mint_for_job

    try:
        settings = load_settings()
    except NpmguardError as err:
        print(f"npmguard: {err}; handing out the stored tokens", file=sys.stderr)
        return _Job(variables)
    grant = mint_for_job(effective, variables, store, settings, registry, scope,
                         command)
    return _Job(grant.variables, minted=grant.minted)


class DaemonError(NpmguardError):
    """The daemon replied with an error; the command is not run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", metavar="URL",
                        help="inject only this registry's credential")
    parser.add_argument(
        "--read-only", action="store_true",
        help="where a token is minted for the job, make it read-only whatever "
             "CMD is (by default publishing commands and unknown commands, "
             "which may run scripts that publish, get publish rights)",
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
