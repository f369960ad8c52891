"""User settings from ``config.toml`` in the user config directory.

Every setting has a default, so a missing file is a valid configuration.
Example (``~/.config/npmguard/config.toml`` on Linux)::

    log_level = "INFO"          # DEBUG, INFO, WARNING or ERROR

    [policy]
    user = "auto"               # the user config: secure at once
    global = "ask"              # the global config: notify only
    project = "ask"             # project files under the roots

    [watch]
    roots = ["~/src"]           # trees searched for project .npmrc files
    rescan_seconds = 300        # full rescan in case events were lost
    debounce_seconds = 0.05     # quiet time before a changed file is read

    [vault]
    backend = "auto"            # auto, keychain or file

    [tray]
    enabled = true              # false: never try to show an icon

    [tokens]                    # defaults for every registry
    rotate_days = 0             # scheduled rotation; 0 turns it off
    mint = true                 # hand out short-lived tokens where possible
    mint_ttl_seconds = 900      # lifetime asked for, where a registry takes one
    remind_days = 90            # age at which a token that cannot rotate is flagged

    [registries."https://registry.example.com/"]
    provider = "auto"           # auto, npm-token-api, gitlab, artifactory, github, none
    api = "https://registry.example.com/api/v4"  # the token API, when not derived
    rotate_days = 7             # any key of [tokens] may be set per registry

Policies: ``auto`` secures a plaintext credential as soon as it is seen,
``ask`` notifies and waits for "Secure now" or ``npmguard secure``, ``off``
ignores the place. A root may set its own policy with a table
``[[watch.root]]`` holding ``path`` and ``policy``. A registry is named by
its URL or by its ``//host/path/`` key, as in ``.npmrc``.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npmguard.errors import NpmguardError

POLICIES = ("auto", "ask", "off")
VAULT_BACKENDS = ("auto", "keychain", "file")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PROVIDER_KINDS = ("auto", "npm-token-api", "gitlab", "artifactory", "github", "none")


class ConfigError(NpmguardError):
    """The settings file is invalid."""


@dataclass(frozen=True)
class Root:
    """A directory tree watched for project ``.npmrc`` files."""

    path: Path
    policy: str


@dataclass(frozen=True)
class TokenSettings:
    """The token settings of one registry."""

    provider: str = "auto"
    api: str | None = None
    rotate_days: float = 0.0
    mint: bool = True
    mint_ttl_seconds: int = 900
    remind_days: float = 90.0


@dataclass(frozen=True)
class Settings:
    path: Path | None = None
    log_level: str = "INFO"
    user_policy: str = "auto"
    global_policy: str = "ask"
    project_policy: str = "ask"
    roots: tuple[Root, ...] = ()
    rescan_seconds: float = 300.0
    debounce_seconds: float = 0.05
    vault_backend: str = "auto"
    tray_enabled: bool = True
    tokens: TokenSettings = TokenSettings()
    registries: dict[str, TokenSettings] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def for_registry(self, registry: str) -> TokenSettings:
        """Return the token settings for a registry URL or ``//host/path/`` key."""
        from npmguard.npmrc.nerf import candidate_keys

        for key in candidate_keys(registry):
            if key in self.registries:
                return self.registries[key]
        return self.tokens


def config_path() -> Path:
    override = os.environ.get("NPMGUARD_CONFIG")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("npmguard", appauthor=False)) / (
        "config.toml"
    )


def load_settings(path: Path | None = None) -> Settings:
    """Read the settings file; a missing file gives the defaults."""
    path = path or config_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Settings(path=None)
    except OSError as err:
        raise ConfigError(f"cannot read settings: {err.strerror}", path=path) from err
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        # tomllib puts the position only into the message before Python 3.14.
        line = getattr(err, "lineno", None)
        position = re.search(r"\(at line (\d+), column \d+\)", str(err))
        if line is None and position:
            line = int(position.group(1))
        message = str(err).split(" (at line")[0]
        raise ConfigError(f"invalid TOML: {message}", path=path, line=line) from err
    return _settings_from(raw, path)


def _settings_from(raw: dict[str, Any], path: Path) -> Settings:
    def fail(message: str) -> ConfigError:
        return ConfigError(message, path=path)

    def choice(table: dict[str, Any], key: str, allowed: tuple[str, ...],
               default: str, where: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str) or value not in allowed:
            raise fail(f"{where}{key} must be one of {', '.join(allowed)}, "
                       f"not {value!r}")
        return value

    def number(table: dict[str, Any], key: str, default: float, where: str) -> float:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise fail(f"{where}{key} must be a positive number of seconds, "
                       f"not {value!r}")
        return float(value)

    def table(name: str) -> dict[str, Any]:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise fail(f"[{name}] must be a table")
        return value

    known = {"log_level", "policy", "watch", "vault", "tray", "tokens", "registries"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise fail(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")

    level = raw.get("log_level", "INFO")
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise fail(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")

    policy = table("policy")
    watch = table("watch")
    vault = table("vault")
    tray = table("tray")
    project_policy = choice(policy, "project", POLICIES, "ask", "policy.")

    roots: list[Root] = []
    for entry in watch.get("roots", []):
        if not isinstance(entry, str):
            raise fail(f"watch.roots entries must be paths, not {entry!r}")
        roots.append(Root(Path(os.path.expanduser(entry)), project_policy))
    for entry in watch.get("root", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise fail("each [[watch.root]] needs a path")
        roots.append(
            Root(
                Path(os.path.expanduser(entry["path"])),
                choice(entry, "policy", POLICIES, project_policy, "watch.root."),
            )
        )

    enabled = tray.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail(f"tray.enabled must be true or false, not {enabled!r}")

    tokens = _token_settings(table("tokens"), TokenSettings(), "tokens.", fail)
    registries: dict[str, TokenSettings] = {}
    for name, entry in table("registries").items():
        where = f"registries.{name!r}."
        if not isinstance(entry, dict):
            raise fail(f"[registries.{name!r}] must be a table")
        try:
            from npmguard.npmrc.nerf import nerf_dart

            key = nerf_dart(name)
        except ValueError as err:
            raise fail(f"[registries.{name!r}]: {err}") from None
        registries[key] = _token_settings(entry, tokens, where, fail)

    return Settings(
        path=path,
        log_level=level.upper(),
        user_policy=choice(policy, "user", POLICIES, "auto", "policy."),
        global_policy=choice(policy, "global", POLICIES, "ask", "policy."),
        project_policy=project_policy,
        roots=tuple(roots),
        rescan_seconds=number(watch, "rescan_seconds", 300.0, "watch."),
        debounce_seconds=number(watch, "debounce_seconds", 0.05, "watch."),
        vault_backend=choice(vault, "backend", VAULT_BACKENDS, "auto", "vault."),
        tray_enabled=enabled,
        tokens=tokens,
        registries=registries,
    )


def _token_settings(
    table: dict[str, Any],
    defaults: TokenSettings,
    where: str,
    fail: Any,
) -> TokenSettings:
    """Read one ``[tokens]`` or ``[registries."URL"]`` table over ``defaults``."""
    allowed = {"rotate_days", "mint", "mint_ttl_seconds", "remind_days"}
    if where != "tokens.":
        allowed |= {"provider", "api"}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise fail(f"unknown setting {where}{unknown[0]}; known: "
                   f"{', '.join(sorted(allowed))}")

    def days(key: str, default: float) -> float:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise fail(f"{where}{key} must be a number of days (0 or more), "
                       f"not {value!r}")
        return float(value)

    provider = table.get("provider", defaults.provider)
    if provider not in PROVIDER_KINDS:
        raise fail(f"{where}provider must be one of {', '.join(PROVIDER_KINDS)}, "
                   f"not {provider!r}")
    api = table.get("api", defaults.api)
    if api is not None and (not isinstance(api, str) or "://" not in api):
        raise fail(f"{where}api must be a URL, not {api!r}")
    mint = table.get("mint", defaults.mint)
    if not isinstance(mint, bool):
        raise fail(f"{where}mint must be true or false, not {mint!r}")
    ttl = table.get("mint_ttl_seconds", defaults.mint_ttl_seconds)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 60 <= ttl <= 86400:
        raise fail(f"{where}mint_ttl_seconds must be a whole number from 60 to "
                   f"86400, not {ttl!r}")
    return TokenSettings(
        provider=provider,
        api=api,
        rotate_days=days("rotate_days", defaults.rotate_days),
        mint=mint,
        mint_ttl_seconds=ttl,
        remind_days=days("remind_days", defaults.remind_days),
    )
