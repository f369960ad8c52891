"""Short-lived tokens minted for one job, instead of the stored long-lived one.

Where a registry can create tokens (its provider's ``Capabilities.mint``),
``npmguard exec`` and the token helper hand a job a token made for it:

- **Scope.** Installs and other reads get a read-only token. Commands that
  publish or change a package's registry data (``publish``, ``dist-tag``,
  ``deprecate``, ``unpublish``, ``owner``, ``access``, ...) get publish
  rights. Anything npmguard does not recognise (``npm run release``,
  ``make``, ``npx tool``) gets publish rights too, because scripts may
  publish. ``npmguard exec --read-only -- CMD`` forces read-only.
  ``scope_for_argv`` decides from a command line. The token helper has
  none of its own, so the daemon reads the command lines of the helper's
  parent processes (pnpm runs the helper) with ``scope_for_chain``.
- **Lifetime.** A token is handed out until ``min(expiry, minted + ttl)``
  less a margin (``MARGIN_SECONDS`` or ``MARGIN_FRACTION`` of its life,
  whichever is smaller), so a job never starts with a token about to die.
  The daemon keeps minted tokens in memory only (``MintCache``), never on
  disk. Read-only tokens are shared by jobs; a publish token serves one
  job (one process) and only for ``PUBLISH_SERVE_SECONDS``.
- **Revocation.** Each job that got a token is a holder, known by process
  id and start time. A token no longer handed out is revoked once its
  holders have ended (``exec`` says so at once with a ``release``
  request; a helper's job is noticed by the sweeper). A token the registry
  expires within the margin anyway is left to expire. ``clear`` (rotation's
  ``invalidate``) and the daemon's stop revoke what is cached.

Minting is skipped, and the stored token handed out, when ``mint = false``
is set, when the provider cannot mint, or when it needs the account
password and none is stored (``npmguard login --store-password``). The
reason is logged once at INFO. A failed mint (registry down, password
changed) falls back to the stored token with a warning and a ``failed``
audit record; it never fails the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as replace_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npmguard.daemon.worker import Worker
from npmguard.errors import NpmguardError
from npmguard.registry.base import (
    PUBLISH,
    READ_ONLY,
    Auth,
    NotSupportedError,
    Provider,
    RegistryError,
    TokenInfo,
    jwt_claims,
)
from npmguard.secret import Secret

if TYPE_CHECKING:
    from npmguard.config import Settings, TokenSettings
    from npmguard.inject.resolve import Credential, Effective
    from npmguard.lifecycle import Managed
    from npmguard.npmrc.credentials import Finding

log = logging.getLogger(__name__)

# A token is handed out until this long before it stops working, or
# MARGIN_FRACTION of its life when that is shorter (a 5 s token keeps 0.5 s).
MARGIN_SECONDS = 30.0
MARGIN_FRACTION = 0.1
# A publish token is handed out again to the same job for this long only.
PUBLISH_SERVE_SECONDS = 60.0
# How often the sweeper checks whether the jobs holding a token have ended.
HOLDER_POLL_SECONDS = 2.0
# A token the registry never expires is revoked this long after its
# lifetime, even while a job still has it, so that a hung job cannot keep it.
MAX_HOLD_SECONDS = 3600.0
# Time the daemon's stop may spend revoking cached tokens, in parallel.
STOP_REVOKE_SECONDS = 0.5
# How many parent processes the token helper's scope is looked for in.
CHAIN_DEPTH = 8
# Sweeps that try to revoke a token before npmguard gives up on it. The
# registry may be down for longer, and then the token lives until it expires.
REVOKE_TRIES = 3

_LEASE_RE = re.compile(r"[0-9a-f]{32}")

# --------------------------------------------------------------------------
# Which scope a command needs

# Package managers whose subcommands are known. npx, pnpx and bunx run a
# package's binary, which may do anything.
TOOLS = frozenset({"npm", "pnpm", "yarn", "bun", "npx", "pnpx", "bunx"})
_RUNNERS = frozenset({"npx", "pnpx", "bunx"})

# Subcommands that only read from the registry, per tool (aliases included).
# Installs run lifecycle scripts too; giving those a read-only token is the
# point: an install script cannot publish with it.
_NPM_READ = frozenset({
    "install", "i", "in", "ins", "inst", "insta", "instal", "isnt", "isnta",
    "isntal", "isntall", "add", "ci", "clean-install", "ic", "install-clean",
    "isntall-clean", "install-test", "it", "install-ci-test", "cit",
    "clean-install-test", "sit", "uninstall", "unlink", "remove", "rm", "r",
    "un", "update", "up", "upgrade", "udpate", "view", "info", "show", "v",
    "whoami", "search", "find", "s", "se", "outdated", "ls", "list", "la",
    "ll", "explain", "why", "audit", "fund", "ping", "pack", "prune",
    "dedupe", "ddp", "rebuild", "rb", "query", "sbom", "doctor", "cache",
    "config", "c", "get", "help", "diff", "link", "ln", "prefix", "root",
    "bin", "docs", "home", "bugs", "repo", "completion", "shrinkwrap",
})
_PNPM_READ = frozenset({
    "install", "i", "add", "update", "up", "upgrade", "remove", "rm",
    "uninstall", "un", "uni", "link", "ln", "unlink", "import", "fetch",
    "install-test", "it", "dedupe", "prune", "rebuild", "rb", "outdated",
    "list", "ls", "ll", "la", "why", "audit", "licenses", "store", "view",
    "info", "show", "v", "root", "bin", "config", "c", "get", "help",
    "deploy", "pack", "patch", "patch-commit", "patch-remove", "env",
    "setup", "doctor", "cat-file", "cat-index", "find-hash", "ping",
    "whoami", "search",
})
_YARN_READ = frozenset({
    "install", "add", "remove", "upgrade", "up", "upgrade-interactive",
    "info", "why", "list", "outdated", "audit", "check", "dedupe", "import",
    "cache", "config", "licenses", "link", "unlink", "pack", "help",
    "autoclean", "generate-lock-entry", "explain", "constraints", "plugin",
    "dlx-never", "set", "bin", "workspaces", "whoami",
})
_BUN_READ = frozenset({
    "install", "i", "add", "a", "remove", "rm", "update", "outdated", "pm",
    "info", "audit", "why", "link", "unlink", "patch", "help",
})
_READ: dict[str, frozenset[str]] = {
    "npm": _NPM_READ, "pnpm": _PNPM_READ, "yarn": _YARN_READ, "bun": _BUN_READ,
}
# Subcommands that publish or change a package's registry data. Unknown
# subcommands get publish rights too; this list documents the intent.
PUBLISHING = frozenset({
    "publish", "unpublish", "deprecate", "undeprecate", "dist-tag",
    "dist-tags", "owner", "author", "access", "team", "org", "token",
    "profile", "star", "unstar", "hook", "tag", "npm", "logout",
})
# Subcommands that read with these second words and write with any other.
_MIXED: dict[str, frozenset[str]] = {
    "dist-tag": frozenset({"ls", "list"}),
    "dist-tags": frozenset({"ls", "list"}),
    "owner": frozenset({"ls", "list"}),
    "author": frozenset({"ls", "list"}),
    "access": frozenset({"list", "get", "ls"}),
    "team": frozenset({"ls", "list"}),
    "org": frozenset({"ls"}),
    "token": frozenset({"list", "ls"}),
    "hook": frozenset({"ls", "list"}),
    "profile": frozenset({"get"}),
    "tag": frozenset({"list", "ls"}),
}
_YARN_NPM_READ = frozenset({"info", "audit", "whoami"})
# Options (before the subcommand) that take the next word as their value.
_VALUE_OPTIONS = frozenset({
    "--registry", "--prefix", "-C", "--dir", "-w", "--workspace", "--filter",
    "-F", "--filter-prod", "--userconfig", "--globalconfig", "--cache",
    "--loglevel", "--cwd", "--otp", "--tag", "--access", "--scope",
    "--reporter", "--store-dir", "--modules-folder", "--mutex",
    "--network-timeout", "--include", "--exclude", "--from", "-j", "--jobs",
    "--workspace-root", "--config", "--location", "-L",
})
# Node options that take the next word as their value.
_NODE_VALUE_OPTIONS = frozenset({
    "-r", "--require", "--import", "--loader", "--experimental-loader",
    "-C", "--conditions", "--title", "--env-file", "--input-type",
})
_NODE_INLINE = frozenset({"-e", "--eval", "-p", "--print"})
_EXTENSIONS = (".exe", ".cmd", ".bat", ".ps1", ".js", ".cjs", ".mjs")
_SCRIPT_NAMES = {"npm-cli": "npm", "npx-cli": "npx"}
_YARN_RELEASE = re.compile(r"yarn-\d[\w.-]*")


def scope_for_argv(argv: Sequence[str]) -> str:
    """Return READ_ONLY or PUBLISH for a job's command line.

    Known read-only subcommands of npm, pnpm, yarn and bun get READ_ONLY;
    publishing ones and anything unknown (scripts, other programs) get
    PUBLISH, because a script may publish.
    """
    parsed = _tool_and_args(argv)
    if parsed is None:
        return PUBLISH
    tool, args = parsed
    return _scope_of_words(tool, _positionals(args))


def scope_for_chain(cmdlines: Iterable[Sequence[str]]) -> str:
    """Return the scope for the token helper, from its parents' command lines.

    ``cmdlines`` starts with the nearest process. The nearest package
    manager decides; ``npmguard exec --read-only`` anywhere in the chain
    forces READ_ONLY; with no package manager in the chain, PUBLISH.
    """
    _, scope = _chain_job(list(cmdlines))
    return scope


def job_command(argv: Sequence[str]) -> str:
    """Return the audit's two words for a job: ``npm publish``, ``pnpm install``."""
    from npmguard import audit

    parsed = _tool_and_args(argv)
    if parsed is None:
        return audit.command_words(_split_title(argv))
    tool, args = parsed
    words = _positionals(args)
    return audit.command_words([tool, *words[:1]])


def _chain_job(lines: Sequence[Sequence[str]]) -> tuple[int | None, str]:
    """Return the index of the nearest package manager in ``lines`` and the scope."""
    forced = any(_is_read_only_exec(line) for line in lines)
    for index, line in enumerate(lines):
        if _tool_and_args(line) is not None:
            return index, READ_ONLY if forced else scope_for_argv(line)
    return None, READ_ONLY if forced else PUBLISH


def _split_title(argv: Sequence[str]) -> list[str]:
    # npm sets process.title ("npm install x"), which Linux then shows as
    # one argument padded with empty ones.
    words = [a for a in argv if a]
    if len(words) == 1 and " " in words[0]:
        return words[0].split()
    return words


def _program_name(path: str) -> str:
    name = re.split(r"[\\/]", path)[-1].lower()
    for extension in _EXTENSIONS:
        if name.endswith(extension):
            name = name[: -len(extension)]
            break
    if _YARN_RELEASE.fullmatch(name):
        return "yarn"
    return _SCRIPT_NAMES.get(name, name)


def _tool_and_args(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """Return (tool, its arguments) when ``argv`` runs a package manager."""
    args = _split_title(argv)
    for _ in range(3):
        if not args:
            return None
        name = _program_name(args[0])
        if name in TOOLS:
            return name, args[1:]
        if name in ("node", "nodejs"):
            script = _node_script(args[1:])
            if script is None:
                return None
            args = args[1 + script :]
            continue
        if name == "corepack":
            args = args[1:]
            continue
        return None
    return None


def _node_script(args: Sequence[str]) -> int | None:
    """Return the index of the script node runs, or None for inline code."""
    skip = False
    for index, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in _NODE_INLINE:
            return None
        if arg.startswith("-"):
            skip = "=" not in arg and arg in _NODE_VALUE_OPTIONS
            continue
        return index
    return None


def _positionals(args: Sequence[str]) -> list[str]:
    """Return the words that are not options, nor values of known options."""
    words: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--":
            break
        if arg.startswith("-") and arg != "-":
            skip = "=" not in arg and arg in _VALUE_OPTIONS
            continue
        words.append(arg)
    return words


def _scope_of_words(tool: str, words: list[str]) -> str:
    if tool in _RUNNERS:
        return PUBLISH
    if tool == "pnpm" and words[:1] in (["recursive"], ["multi"], ["m"]):
        words = words[1:]
    if tool == "yarn" and words:
        if words[0] == "workspace" and len(words) > 2:
            return _scope_of_words("yarn", words[2:])
        if words[:2] == ["workspaces", "foreach"]:
            return _scope_of_words("yarn", words[2:])
        if words[0] == "npm":
            npm_command = words[1] if len(words) > 1 else ""
            if npm_command == "tag":
                return READ_ONLY if words[2:3] == ["list"] else PUBLISH
            return READ_ONLY if npm_command in _YARN_NPM_READ else PUBLISH
    if not words:
        # npm, pnpm and bun print their help; yarn alone installs.
        return READ_ONLY
    sub = words[0]
    if sub in _MIXED:
        return READ_ONLY if words[1:2] and words[1] in _MIXED[sub] else PUBLISH
    return READ_ONLY if sub in _READ.get(tool, frozenset()) else PUBLISH


def _is_read_only_exec(argv: Sequence[str]) -> bool:
    """True for ``npmguard exec --read-only ...`` (as a script or ``-m npmguard``)."""
    args = _split_title(argv)
    for index, arg in enumerate(args):
        named = _program_name(arg) == "npmguard"
        if named and (index == 0 or args[index - 1] == "-m" or index == 1):
            rest = args[index + 1 :]
            if "--" in rest:
                rest = rest[: rest.index("--")]
            return "exec" in rest and "--read-only" in rest
    return False


# --------------------------------------------------------------------------
# Processes: who asked, and is the job still running


@dataclass(frozen=True)
class ProcessInfo:
    """What the kernel tells about one process; ``started`` tells pid reuse apart."""

    pid: int
    ppid: int | None
    name: str
    cmdline: tuple[str, ...]
    started: float | None
    zombie: bool = False


def _read_linux(pid: int) -> ProcessInfo | None:
    # Two small reads per process: cheaper than a psutil.Process per
    # ancestor, and the CLI's direct path does not import psutil at all.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    close = stat.rfind(b")")
    name = stat[stat.find(b"(") + 1 : close].decode(errors="replace")
    fields = stat[close + 2 :].split()
    try:
        ppid = int(fields[1])
        started = float(fields[19])
    except (IndexError, ValueError):
        return None
    cmdline = tuple(
        part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")
    )
    return ProcessInfo(pid, ppid, name, cmdline, started,
                       zombie=fields[0] in (b"Z", b"X"))


def _read_psutil(pid: int) -> ProcessInfo | None:
    # NOTE: not run in this project's tests, which run on Linux.
    import psutil  # type: ignore[import-untyped,unused-ignore]

    try:
        process = psutil.Process(pid)
        with process.oneshot():
            status = process.status()
            return ProcessInfo(
                pid, process.ppid(), process.name(), tuple(process.cmdline()),
                process.create_time(), zombie=status == psutil.STATUS_ZOMBIE,
            )
    except (psutil.Error, OSError):
        return None


# The one place that picks how processes are read on this platform.
read_process: Callable[[int], ProcessInfo | None] = (
    _read_linux if sys.platform.startswith("linux") else _read_psutil
)


def ancestors(pid: int | None, depth: int = CHAIN_DEPTH) -> list[ProcessInfo]:
    """Return ``pid`` and up to ``depth`` of its parents, nearest first."""
    chain: list[ProcessInfo] = []
    current = pid
    while current and len(chain) <= depth:
        info = read_process(current)
        if info is None:
            break
        chain.append(info)
        if not info.ppid or info.ppid == current:
            break
        current = info.ppid
    return chain


def peer_summary(chain: Sequence[ProcessInfo], pid: int | None) -> dict[str, Any]:
    """The audit's view of a process: pid, name and its parents' names (no argv)."""
    summary: dict[str, Any] = {"pid": pid}
    if chain:
        summary["exe"] = chain[0].name
        summary["parents"] = [p.name for p in chain[1:4]]
    return summary


@dataclass(frozen=True)
class Holder:
    """A job that got a token: a process, by pid and start time.

    A holder with no pid (a platform that does not tell the peer) counts
    as running until it releases its tokens.
    """

    pid: int | None
    started: float | None
    label: str = ""

    @property
    def key(self) -> tuple[object, ...]:
        return (self.pid, self.started, self.label)

    def alive(self) -> bool:
        if self.pid is None:
            return True
        info = read_process(self.pid)
        return info is not None and not info.zombie and info.started == self.started

    @classmethod
    def of(cls, info: ProcessInfo) -> Holder:
        return cls(info.pid, info.started)


# --------------------------------------------------------------------------
# Deciding, minting and revoking


@dataclass(frozen=True)
class Plan:
    """Everything needed to mint for one stored token."""

    entry: Managed
    settings: TokenSettings
    provider: Provider

    def scope_for(self, requested: str) -> str:
        """Return the scope to mint for a job that needs ``requested``.

        A registry that cannot make read-only tokens (Artifactory, for a
        user) gets a publish token for an install too: short-lived and
        revoked after the job, it is still narrower than the stored token,
        which has the same rights and no end.
        """
        if requested == READ_ONLY and not self.provider.capabilities.read_only:
            return PUBLISH
        return requested


@dataclass(eq=False)
class Minted:
    """A token minted for jobs; lives in memory only."""

    name: str  # the stored token's vault name
    registry: str  # //host/path/
    scope: str
    value: Secret
    info: TokenInfo
    provider: Provider
    auth: Auth  # the stored token and password, which revoke it
    end: float  # monotonic: when it stops working, or npmguard revokes it
    serve_until: float  # monotonic: the last moment it is handed out
    margin: float
    expires: float | None  # epoch seconds, when the registry expires it itself
    holders: dict[tuple[object, ...], Holder] = field(default_factory=dict)
    revoked: bool = False  # the registry confirmed it
    closed: bool = False  # npmguard is done with it: revoked, expired or given up
    tries: int = 0
    # One revocation at a time: the sweeper, a release and a clear may meet.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                 compare=False)

    @property
    def fingerprint(self) -> str:
        return self.value.fingerprint

    def summary(self) -> dict[str, Any]:
        """What a client may learn about it: never the value."""
        return {"registry": self.registry, "fingerprint": self.fingerprint,
                "scope": self.scope, "expires": self.expires}


def record(event: str, **fields: object) -> None:
    """Append an audit record; a failure is logged and never fails the job."""
    try:
        from npmguard import audit

        audit.record(event, **{k: v for k, v in fields.items() if v is not None})
    except (OSError, ValueError, NpmguardError) as err:
        log.warning("could not write the %s audit record: %s", event, err)


class Minter:
    """Decides whether a stored token may be replaced by minted ones, and mints."""

    def __init__(
        self,
        settings: Settings,
        store: Any,
        *,
        provider_for: Callable[[str, TokenSettings], Provider] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self._provider_for = provider_for or _default_provider
        self.clock = clock

    def plan(
        self, name: str, urls: Callable[[], Mapping[str, str]] = dict
    ) -> Plan | str:
        """Return how to mint for the stored token ``name``, or why not to."""
        from npmguard.lifecycle import managed

        try:
            entry = next((m for m in managed() if m.name == name), None)
        except (NpmguardError, OSError, ValueError) as err:
            return f"the credential index cannot be read: {err}"
        if entry is None:
            return "npmguard has no index entry for it (run `npmguard secure` again)"
        if not entry.is_token:
            return f"it is {entry.kind or 'not a token'}, not a registry token"
        settings = self.settings.for_registry(entry.registry)
        if not settings.mint:
            return "minting is turned off (mint = false in config.toml)"
        url = entry.meta.get("url")
        try:
            provider = self._provider_for(
                url if isinstance(url, str) and url else entry.url(urls()), settings
            )
        except (NpmguardError, ValueError) as err:
            return f"no token API for it: {err}"
        caps = provider.capabilities
        if not caps.mint:
            return f"its registry ({caps.provider}) cannot mint tokens: {caps.note}"
        if caps.needs_password and entry.password_name is None:
            return ("minting needs the account password and none is stored; "
                    "`npmguard login --store-password` stores it")
        return Plan(entry, settings, provider)

    def mint(self, plan: Plan, scope: str, *, command: str = "",
             peer: Mapping[str, Any] | None = None) -> Minted:
        """Create a token with ``scope``; raise RegistryError, VaultError, OSError."""
        from npmguard.vault.base import require

        entry = plan.entry
        stored = require(self.store, entry.name)
        password = (require(self.store, entry.password_name)
                    if entry.password_name else None)
        auth = Auth(stored, password)
        ttl = plan.settings.mint_ttl_seconds
        started_wall, started = time.time(), self.clock()
        issued = plan.provider.create(auth, scope=scope, ttl_seconds=ttl)
        expires = issued.info.expires or _jwt_expiry(issued.value)
        life = float(ttl)
        if expires is not None:
            life = min(life, expires - started_wall)
        life = max(life, 0.0)
        margin = min(MARGIN_SECONDS, MARGIN_FRACTION * life)
        end = started + life
        serve_until = end - margin
        if scope == PUBLISH:
            serve_until = min(serve_until, started + PUBLISH_SERVE_SECONDS)
        minted = Minted(
            name=entry.name, registry=entry.registry, scope=scope,
            value=issued.value, info=issued.info, provider=plan.provider,
            auth=auth, end=end, serve_until=serve_until, margin=margin,
            expires=expires,
        )
        record("minted", registry=entry.registry, fingerprint=minted.fingerprint,
               scope=scope, expires=expires,
               provider=plan.provider.capabilities.provider,
               stored_fingerprint=stored.fingerprint, command=command or None,
               peer=dict(peer) if peer else None)
        log.info("minted a %s token for %s (fingerprint %s, from stored %s, "
                 "lives %.0f s) for %s", scope, entry.registry, minted.fingerprint,
                 stored.fingerprint, life, command or "a job")
        return minted


def revoke(minted: Minted, reason: str) -> bool:
    """Revoke ``minted`` at its registry; log and audit either way."""
    with minted.lock:
        if minted.revoked or minted.closed:
            return minted.revoked
        return _revoke_locked(minted, reason)


def _revoke_locked(minted: Minted, reason: str) -> bool:
    provider = minted.provider
    if not provider.capabilities.revoke:
        log.info("%s cannot revoke tokens; the minted token %s stays valid until "
                 "it expires", minted.registry, minted.fingerprint)
        minted.closed = True
        return False
    try:
        provider.revoke(minted.auth, minted.value, minted.info)
    except NotSupportedError as err:
        minted.closed = True
        record("refused", registry=minted.registry, fingerprint=minted.fingerprint,
               reason=f"revoke not possible: {err}")
        log.warning("could not revoke the minted token %s for %s: %s",
                    minted.fingerprint, minted.registry, err)
        return False
    except (RegistryError, NpmguardError, OSError) as err:
        record("failed", registry=minted.registry, fingerprint=minted.fingerprint,
               reason=f"revoking a minted token: {err}")
        log.warning("could not revoke the minted token %s for %s (%s); it stays "
                    "valid until it expires", minted.fingerprint, minted.registry,
                    err)
        return False
    minted.revoked = minted.closed = True
    record("revoked", registry=minted.registry, fingerprint=minted.fingerprint,
           scope=minted.scope, reason=reason)
    log.info("revoked the minted %s token %s for %s: %s", minted.scope,
             minted.fingerprint, minted.registry, reason)
    return True


def _default_provider(url: str, settings: TokenSettings) -> Provider:
    from npmguard.registry import detect

    return detect.provider_for(
        url,
        kind=None if settings.provider == "auto" else settings.provider,
        api=settings.api,
    )


def _jwt_expiry(value: Secret) -> float | None:
    """The ``exp`` of a JWT, unverified: only to stop serving it in time."""
    claims = jwt_claims(value) or {}
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


# --------------------------------------------------------------------------
# The daemon's cache


class MintCache:
    """Minted tokens by (vault name, scope), with their holders; memory only.

    Read-only tokens are shared by every job. A publish token is keyed by
    its holder too, so one job's publish token never reaches another.
    ``sweep`` revokes what is no longer needed and returns when to run it
    again; ``wake`` is set whenever that may have changed.
    """

    def __init__(
        self,
        revoke_fn: Callable[[Minted, str], bool] = revoke,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._revoke = revoke_fn
        self.clock = clock
        self._lock = threading.Lock()
        self._serving: dict[tuple[object, ...], Minted] = {}
        self._live: list[Minted] = []
        self._leases: dict[str, tuple[Holder, list[Minted]]] = {}
        self._minting: dict[tuple[object, ...], threading.Lock] = {}
        self._closed = False
        self.wake = threading.Event()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def obtain(
        self, name: str, scope: str, holder: Holder, mint: Callable[[], Minted]
    ) -> tuple[Minted, bool]:
        """Return a token to serve and whether it was minted now.

        ``mint`` runs at most once at a time per key, so jobs asking
        together share one new token instead of minting one each.
        """
        key: tuple[object, ...] = (name, scope)
        if scope != READ_ONLY:
            key += holder.key
        with self._lock:
            if self._closed:
                # Nothing would revoke a token minted now.
                raise NpmguardError("the daemon is stopping")
            key_lock = self._minting.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                current = self._serving.get(key)
                if (current is not None and not current.closed
                        and self.clock() < current.serve_until):
                    current.holders[holder.key] = holder
                    return current, False
            minted = mint()
            with self._lock:
                if self._closed:
                    self._closed_meanwhile(minted)
                    raise NpmguardError("the daemon is stopping")
                minted.holders[holder.key] = holder
                self._serving[key] = minted
                self._live.append(minted)
        self.wake.set()
        return minted, True

    def lease(self, holder: Holder, tokens: list[Minted]) -> str:
        """Tie ``tokens`` to one job that will say when it ends; return the id."""
        lease = secrets.token_hex(16)
        with self._lock:
            self._leases[lease] = (holder, list(tokens))
        return lease

    def release(self, lease: str) -> int | None:
        """The job behind ``lease`` ended: revoke what no one needs; None if unknown."""
        with self._lock:
            found = self._leases.pop(lease, None)
            if found is None:
                return None
            holder, tokens = found
            still_leased = {
                id(m) for other, held in self._leases.values()
                if other.key == holder.key for m in held
            }
            now = self.clock()
            done = []
            for minted in tokens:
                if id(minted) not in still_leased:
                    minted.holders.pop(holder.key, None)
                if not minted.closed and self._finished(minted, now):
                    done.append(minted)
        revoked = sum(self._drop(m, "the job ended") for m in done)
        self.wake.set()
        return revoked

    def sweep(self) -> float | None:
        """Revoke tokens that are no longer needed; return seconds until next time."""
        now = self.clock()
        due: list[tuple[Minted, str]] = []
        deadlines: list[float] = []
        with self._lock:
            for minted in list(self._live):
                if minted.closed:
                    self._forget(minted)
                    continue
                for key, holder in list(minted.holders.items()):
                    if not holder.alive():
                        del minted.holders[key]
                reason = self._why_done(minted, now)
                if reason is not None:
                    due.append((minted, reason))
                    continue
                deadlines.append(self._next_check(minted, now))
            for key in [k for k, m in self._serving.items() if m.closed
                        or now >= m.serve_until]:
                del self._serving[key]
            for key in [k for k, lock in self._minting.items()
                        if k not in self._serving and not lock.locked()]:
                del self._minting[key]
        for minted, reason in due:
            self._drop(minted, reason)
        if due:
            # Dropping changed nothing the next deadline depends on, but a
            # token that failed to revoke is looked at again soon.
            deadlines.append(now + HOLDER_POLL_SECONDS)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock())

    def clear(self, reason: str) -> int:
        """Stop handing out every token; revoke those no running job holds.

        A token a job still holds stays valid until that job ends, when the
        sweep revokes it: a minted token belongs to the account, not to the
        stored token, so a rotation need not break builds in progress.
        Returns how many were revoked now.
        """
        now = self.clock()
        with self._lock:
            self._serving.clear()
            idle = []
            for minted in self._live:
                if minted.closed:
                    continue
                for key, holder in list(minted.holders.items()):
                    if not holder.alive():
                        del minted.holders[key]
                minted.serve_until = min(minted.serve_until, now)
                if not minted.holders:
                    idle.append(minted)
        revoked = sum(self._drop(m, reason) for m in idle)
        self.wake.set()
        return revoked

    def close(self, budget: float = STOP_REVOKE_SECONDS) -> None:
        """Revoke every token within ``budget`` seconds, in parallel."""
        with self._lock:
            self._closed = True
            tokens = [m for m in self._live if not m.closed
                      and not _expires_soon(m, self.clock())]
            self._live.clear()
            self._serving.clear()
            self._leases.clear()
        if not tokens:
            return
        threads = [
            threading.Thread(target=self._drop, args=(m, "the daemon stopped"),
                             name="npmguard-mint-revoke", daemon=True)
            for m in tokens
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + budget
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = [m.fingerprint for m in tokens if not m.closed]
        if left:
            log.warning("stopped before revoking %d minted token(s) (fingerprint "
                        "%s); they stay valid until they expire", len(left),
                        ", ".join(left))

    # --- helpers (called with the lock held, except _drop) -----------------

    def _closed_meanwhile(self, minted: Minted) -> None:
        # Minted while the daemon stopped: revoke it in the background, as
        # the lock is held here and the stop must not wait for it.
        threading.Thread(target=self._revoke, args=(minted, "the daemon stopped"),
                         name="npmguard-mint-revoke", daemon=True).start()

    def _finished(self, minted: Minted, now: float) -> bool:
        return self._why_done(minted, now) is not None

    def _why_done(self, minted: Minted, now: float) -> str | None:
        if minted.expires is not None and now >= minted.end:
            return "it expired"
        if minted.holders:
            if minted.expires is None and now >= minted.end + MAX_HOLD_SECONDS:
                return "its lifetime ended long ago and a job still holds it"
            return None
        if minted.scope == READ_ONLY and now < minted.serve_until:
            return None  # kept for the next job
        return "it is no longer handed out and its jobs ended"

    def _next_check(self, minted: Minted, now: float) -> float:
        if minted.holders:
            if minted.scope == READ_ONLY and now < minted.serve_until:
                return minted.serve_until
            # _why_done has made sure that ``limit`` is still ahead.
            limit = (minted.end if minted.expires is not None
                     else minted.end + MAX_HOLD_SECONDS)
            return min(now + HOLDER_POLL_SECONDS, limit)
        return minted.serve_until

    def _forget(self, minted: Minted) -> None:
        with contextlib.suppress(ValueError):
            self._live.remove(minted)

    def _drop(self, minted: Minted, reason: str) -> bool:
        """Revoke (or let expire) one token; True when the registry revoked it.

        A failed revoke is tried again by later sweeps, ``REVOKE_TRIES`` in
        all, unless the token is no longer in the cache (``clear``, stop).
        """
        now = self.clock()
        ok = False
        if _expires_soon(minted, now):
            log.info("minted token %s for %s expires by itself within %.1f s; "
                     "not revoking it", minted.fingerprint, minted.registry,
                     max(0.0, minted.end - now))
            minted.closed = True
        else:
            ok = self._revoke(minted, reason)
            minted.tries += 1
            if not ok and not minted.closed and minted.tries >= REVOKE_TRIES:
                log.warning("gave up revoking the minted token %s for %s after %d "
                            "tries; it stays valid until it expires",
                            minted.fingerprint, minted.registry, minted.tries)
                minted.closed = True
        if minted.closed:
            with self._lock:
                self._forget(minted)
        return ok


def _expires_soon(minted: Minted, now: float) -> bool:
    """True when the registry itself ends the token within the margin."""
    return minted.expires is not None and minted.end - now <= minted.margin


# --------------------------------------------------------------------------
# What the daemon and the CLI use


@dataclass(frozen=True)
class Grant:
    """The token one request gets: minted, or the stored one and why."""

    credential: Credential
    minted: Minted | None = None
    note: str | None = None  # why the stored token is handed out
    warning: str | None = None  # a mint that failed; the stored token is used


@dataclass
class ExecGrant:
    """What an ``env`` request gets: variables, and the tokens minted for it."""

    variables: dict[str, str]
    minted: list[Minted] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why a stored token is used
    lease: str | None = None


class _Notes:
    """Says once per stored token and reason why it is handed out unminted.

    ``by_registry`` keeps the latest reason per registry, for ``status``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._said: set[tuple[str, str]] = set()
        self.by_registry: dict[str, str] = {}

    def say(self, registry: str, name: str, fingerprint: str, reason: str) -> None:
        with self._lock:
            self.by_registry[registry] = reason
        self.once(name, f"{registry}: handing out the stored token (fingerprint "
                        f"{fingerprint}), not a minted one: {reason}")

    def once(self, name: str, message: str) -> None:
        with self._lock:
            if (name, message) in self._said:
                return
            self._said.add((name, message))
        log.info("%s", message)


def _minting_scope(plan: Plan, requested: str, notes: _Notes) -> str:
    """Return the scope to mint for ``requested``; say once when it differs."""
    scope = plan.scope_for(requested)
    if scope != requested:
        message = (f"{plan.entry.registry}: the registry cannot create {requested} "
                   f"tokens, so jobs get short-lived {scope} tokens")
        notes.once(plan.entry.name, message)
    return scope


class MintService(Worker):
    """The daemon's minting: plans, the cache, its sweeper, and the requests.

    A ``Worker``: started and stopped with the daemon's other parts. Its
    thread sweeps the cache; at stop it revokes what is cached within
    ``STOP_REVOKE_SECONDS`` and returns at once when the cache is empty.
    """

    name = "mint"

    def __init__(
        self,
        settings: Settings,
        store: Any,
        *,
        provider_for: Callable[[str, TokenSettings], Provider] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.minter = Minter(settings, store, provider_for=provider_for, clock=clock)
        self.cache = MintCache(clock=clock)
        self.notes = _Notes()

    # --- the worker --------------------------------------------------------

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                delay = self.cache.sweep()
            except Exception:  # noqa: BLE001 - logged; the next sweep tries again
                log.exception("sweeping minted tokens failed")
                delay = HOLDER_POLL_SECONDS
            # An empty cache waits for the next token with no timer at all.
            self.cache.wake.wait(delay)
            self.cache.wake.clear()
        self.cache.close(STOP_REVOKE_SECONDS)

    def stop(self) -> None:
        super().stop()
        self.cache.wake.set()

    def status(self) -> dict[str, Any]:
        """Summarise the cache for ``npmguard status``: no values, no fingerprints."""
        return {"minted_tokens": len(self.cache),
                "not_minting": dict(self.notes.by_registry)}

    def clear(self, reason: str = "cached tokens were invalidated") -> int:
        """Revoke and forget every minted token (rotation's ``invalidate``)."""
        count = self.cache.clear(reason)
        if count:
            log.info("revoked %d minted token(s): %s", count, reason)
        return count

    # --- requests ----------------------------------------------------------

    def for_token(
        self,
        credential: Credential,
        finding: Finding | None,
        peer_pid: int | None,
        *,
        env: Mapping[str, str],
        cwd: Path,
    ) -> Grant:
        """Serve the token helper: a minted token for the job that runs it."""
        chain = ancestors(peer_pid)
        peer = peer_summary(chain, peer_pid)
        grant = self._token_grant(credential, finding, chain, peer, env, cwd)
        used = grant.credential
        record("handed-out", registry=used.registry,
               fingerprint=used.value.fingerprint,
               minted=grant.minted is not None,
               stored_fingerprint=(grant.minted.auth.token.fingerprint
                                   if grant.minted else None),
               scope=grant.minted.scope if grant.minted else None,
               command=self._command_of(chain), peer=peer)
        return grant

    def for_exec(
        self,
        effective: Effective,
        variables: dict[str, str],
        request: Mapping[str, Any],
        peer_pid: int | None,
    ) -> ExecGrant:
        """Serve ``exec``: mint for each token in ``variables`` with the job's scope."""
        from npmguard import audit
        from npmguard.inject.resolve import exec_findings

        scope = request.get("scope")
        words = request.get("command")
        command = audit.command_words(words.split()) if isinstance(words, str) else ""
        chain = ancestors(peer_pid, 3)
        peer = peer_summary(chain, peer_pid)
        grant = ExecGrant(dict(variables))
        if scope in (READ_ONLY, PUBLISH) and variables:
            holder = (Holder.of(chain[0]) if chain and chain[0].pid == peer_pid
                      else Holder(None, None, secrets.token_hex(8)))
            findings = exec_findings(effective, request.get("registry"))
            swap_exec_tokens(
                grant, findings, str(scope), command, peer,
                lambda name, minting, mint: self.cache.obtain(name, minting, holder,
                                                           mint),
                self.minter, self.notes,
                lambda: _request_urls(request),
            )
            if grant.minted:
                grant.lease = self.cache.lease(holder, grant.minted)
        for variable, value in grant.variables.items():
            minted = next((m for m in grant.minted if m.value.reveal() == value), None)
            record("handed-out", registry=_registry_of(variable),
                   fingerprint=Secret(value).fingerprint, minted=minted is not None,
                   stored_fingerprint=(minted.auth.token.fingerprint
                                       if minted else None),
                   scope=minted.scope if minted else None, command=command or None,
                   peer=peer)
        return grant

    def handle_release(self, request: dict[str, Any], peer: Any) -> dict[str, Any]:
        """The ``release`` op: ``{"op": "release", "lease": "<32 hex>"}``."""
        lease = request.get("lease")
        if not isinstance(lease, str) or not _LEASE_RE.fullmatch(lease):
            return {"ok": False,
                    "error": "invalid request: lease must be 32 hex digits"}
        revoked = self.cache.release(lease)
        if revoked is None:
            log.info("release from %s for a lease this daemon does not know",
                     peer.describe() if hasattr(peer, "describe") else "a client")
            return {"ok": True, "released": False, "revoked": 0}
        return {"ok": True, "released": True, "revoked": revoked}

    # --- helpers -------------------------------------------------------------

    def _token_grant(
        self,
        credential: Credential,
        finding: Finding | None,
        chain: list[ProcessInfo],
        peer: dict[str, Any],
        env: Mapping[str, str],
        cwd: Path,
    ) -> Grant:
        name = finding.vault_name if finding is not None else None
        stored = credential.value
        if (credential.kind != "_authToken" or finding is None
                or finding.state != "secured" or not name):
            return Grant(credential)
        index, scope = _chain_job([p.cmdline for p in chain[1:]])
        if index is None:
            reason = ("the process asking is not run by npm, pnpm, yarn or bun, so "
                      "npmguard cannot tell when its job ends")
            self.notes.say(credential.registry, name, stored.fingerprint, reason)
            return Grant(credential, note=reason)
        job = chain[1 + index]
        plan = self.minter.plan(name, lambda: _configured_urls(env, cwd))
        if isinstance(plan, str):
            self.notes.say(credential.registry, name, stored.fingerprint, plan)
            return Grant(credential, note=plan)
        command = job_command(job.cmdline)
        scope = _minting_scope(plan, scope, self.notes)
        try:
            minted, _ = self.cache.obtain(
                name, scope, Holder.of(job),
                lambda: self.minter.mint(plan, scope, command=command, peer=peer),
            )
        except (RegistryError, NpmguardError, OSError) as err:
            warning = _mint_failed(credential.registry, stored, scope, err, command)
            return Grant(credential, warning=warning)
        _register(minted.value)
        return Grant(replace_field(credential, value=minted.value), minted=minted)

    @staticmethod
    def _command_of(chain: list[ProcessInfo]) -> str | None:
        index, _ = _chain_job([p.cmdline for p in chain[1:]])
        return None if index is None else job_command(chain[1 + index].cmdline)


def swap_exec_tokens(
    grant: ExecGrant,
    findings: Sequence[Finding],
    scope: str,
    command: str,
    peer: Mapping[str, Any],
    obtain: Callable[[str, str, Callable[[], Minted]], tuple[Minted, bool]],
    minter: Minter,
    notes: _Notes,
    urls: Callable[[], Mapping[str, str]],
) -> None:
    """Replace each stored token in ``grant.variables`` with one minted for the job.

    A token that may not be minted for stays as it is (``notes`` says why
    once); a mint that fails leaves it too, with a warning in ``grant``.
    """
    for finding in findings:
        variable = f"npm_config_{finding.key}"
        name = finding.vault_name
        if finding.kind != "_authToken" or not name or variable not in grant.variables:
            continue
        stored = Secret(grant.variables[variable])
        registry = finding.registry or ""
        plan = minter.plan(name, urls)
        if isinstance(plan, str):
            notes.say(registry, name, stored.fingerprint, plan)
            grant.notes.append(f"{registry}: handing out the stored token "
                               f"(fingerprint {stored.fingerprint}): {plan}")
            continue
        minting = _minting_scope(plan, scope, notes)

        def mint(plan: Plan = plan, minting: str = minting) -> Minted:
            return minter.mint(plan, minting, command=command, peer=peer)

        try:
            minted, _ = obtain(name, minting, mint)
        except (RegistryError, NpmguardError, OSError) as err:
            grant.warnings.append(_mint_failed(registry, stored, minting, err, command))
            continue
        _register(minted.value)
        grant.variables[variable] = minted.value.reveal()
        if minted not in grant.minted:
            grant.minted.append(minted)


def mint_for_job(
    effective: Effective,
    variables: dict[str, str],
    store: Any,
    settings: Settings,
    registry: str | None,
    scope: str,
    command: str,
) -> ExecGrant:
    """``exec`` with no daemon: mint in this process; the caller revokes after."""
    from npmguard.inject.resolve import exec_findings
    from npmguard.lifecycle import configured_urls

    minter = Minter(settings, store)
    grant = ExecGrant(dict(variables))
    peer = peer_summary(ancestors(os.getpid(), 3), os.getpid())
    if variables:
        try:
            swap_exec_tokens(
                grant, exec_findings(effective, registry), scope, command, peer,
                lambda name, minting, mint: (mint(), True), minter, _Notes(),
                lambda: configured_urls(os.environ, effective.cwd),
            )
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) between two mints: nothing will
            # use the tokens made so far.
            for minted in grant.minted:
                revoke(minted, "exec was interrupted")
            raise
    for variable, value in grant.variables.items():
        minted = next((m for m in grant.minted if m.value.reveal() == value), None)
        record("handed-out", registry=_registry_of(variable),
               fingerprint=Secret(value).fingerprint, minted=minted is not None,
               stored_fingerprint=minted.auth.token.fingerprint if minted else None,
               scope=minted.scope if minted else None, command=command or None,
               peer=peer)
    return grant


def _mint_failed(
    registry: str, stored: Secret, scope: str, err: BaseException, command: str
) -> str:
    message = (f"{registry}: could not mint a {scope} token ({err}); handing out "
               "the stored token instead")
    log.warning("%s", message)
    record("failed", registry=registry, fingerprint=stored.fingerprint, scope=scope,
           reason=f"minting: {err}", command=command or None)
    return message


def _registry_of(variable: str) -> str:
    key = variable[len("npm_config_"):] if variable.startswith("npm_config_") else ""
    return key.rsplit(":", 1)[0] if ":" in key else key


def _configured_urls(env: Mapping[str, str], cwd: Path) -> Mapping[str, str]:
    from npmguard.lifecycle import configured_urls

    return configured_urls(env, cwd)


def _request_urls(request: Mapping[str, Any]) -> Mapping[str, str]:
    env = request.get("env")
    cwd = request.get("cwd")
    if not isinstance(env, dict) or not isinstance(cwd, str):
        return {}
    return _configured_urls(env, Path(cwd))


def _register(value: Secret) -> None:
    from npmguard.logsetup import register_secret

    register_secret(value)
