"""``npmguard login``: log in to a registry and keep the token only in the vault.

The token goes from the registry's reply straight into the vault. The user
config gets the same marker comment ``secure`` writes (``; npmguard:ID
//host/:_authToken=<keychain>``, no value), so ``exec``, ``token``, the
pnpm token helper and ``restore`` find it like any secured credential.

Where the registry can create tokens from a password (npm's token API), the
login's session token is exchanged for a token made with the API, because
only those can be revoked later by ``npmguard rotate``. The password is
kept only with ``--store-password``, which lets npmguard mint short-lived
tokens and rotate without asking.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time

from npmguard.errors import NpmguardError, UsageError
from npmguard.npmrc.nerf import nerf_dart
from npmguard.registry.base import (
    Auth,
    IssuedToken,
    NotSupportedError,
    OtpRequiredError,
    Provider,
    TokenInfo,
)
from npmguard.secret import Secret
from npmguard.vault.base import CredentialStore


class LoginError(NpmguardError):
    """The login did not give a usable token."""


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from npmguard import audit
    from npmguard.commands.secure import _want_helpers, secured_registries
    from npmguard.config import load_settings
    from npmguard.inject.helpers import sync_token_helpers
    from npmguard.inject.resolve import Effective
    from npmguard.migrate import PASSWORD_SUFFIX, add_secured
    from npmguard.npmrc.locate import user_config_path
    from npmguard.npmrc.nerf import InvalidRegistryError
    from npmguard.registry import detect
    from npmguard.registry.base import PUBLISH, RegistryError
    from npmguard.vault import open_default_store

    if args.store_password and args.token_stdin:
        raise UsageError("--store-password needs a password login, not --token-stdin")
    url = args.registry or Effective(os.environ, Path.cwd()).default_registry()
    try:
        nerf = nerf_dart(url)
    except InvalidRegistryError as err:
        raise UsageError(f"--registry: {err}") from None
    settings = load_settings().for_registry(url)
    provider = detect.provider_for(
        url,
        kind=None if settings.provider == "auto" else settings.provider,
        api=settings.api,
    )

    password: Secret | None = None
    if args.token_stdin:
        issued_value = _read_stdin_secret("token")
        info = None
        how = "given token"
    else:
        issued, password = _log_in(provider, args)
        issued_value, info = issued.value, issued.info
        how = "login"

    user = provider.whoami(issued_value)
    exchanged = False
    caps = provider.capabilities
    if password is not None and caps.rotate and caps.needs_password:
        # A login's session token cannot be revoked through the token API;
        # one created by the API can, so rotation can retire it later.
        try:
            made = provider.create(
                Auth(issued_value, password, args.otp), scope=PUBLISH, ttl_seconds=None
            )
        except RegistryError as err:
            print(f"npmguard: keeping the login token; creating an API token "
                  f"failed: {err}", file=sys.stderr)
        else:
            issued_value, info, exchanged = made.value, made.info, True
            provider.whoami(issued_value)

    store = open_default_store()
    meta: dict[str, object] = {
        "origin": "login",
        "url": url,
        "username": user,
        "provider": caps.provider,
        "issued": (info.created if info and info.created else time.time()),
    }
    if info is not None:
        meta.update({k: v for k, v in (("expires", info.expires),
                                         ("token_key", info.key),
                                         ("read_only", info.read_only))
                     if v is not None})
    extra = {}
    if args.store_password and password is not None:
        meta["password"] = True
        extra[PASSWORD_SUFFIX] = password
    user_config = user_config_path(os.environ)
    earlier = _earlier_logins(nerf, store)
    try:
        added = add_secured(user_config, f"{nerf}:_authToken", issued_value, store,
                            meta, extra)
    except BaseException:
        if exchanged:
            # Nothing keeps the token just made; it must not stay valid.
            _revoke_quietly(provider, Auth(issued_value, password), issued_value,
                            info, "the login did not finish")
        raise
    replaced_names = {f.vault_name for f in added.replaced if f.vault_name}
    revoked = 0
    for name, (old_value, old_key) in earlier.items():
        # Made by an earlier `npmguard login` and never shown to anyone, so
        # nothing else can be using it once its line is replaced.
        if name in replaced_names and old_value != issued_value:
            revoked += _revoke_quietly(provider, Auth(issued_value, password),
                                       old_value, TokenInfo(key=old_key),
                                       "replaced by a new login")

    audit.note("login", registry=nerf, provider=caps.provider, username=user,
               fingerprint=issued_value.fingerprint,
               reason=how + (" exchanged for an API token" if exchanged else ""))
    print(f"logged in to {url} as {user}; the token is in the {store.description} "
          f"(fingerprint {issued_value.fingerprint}), and no file holds it")
    for finding in added.replaced:
        if finding.vault_name in earlier:
            continue
        print(f"replaced the earlier {finding.kind} line at {user_config}:"
              f"{finding.line} ({finding.state}); that token still works until it "
              "is revoked")
    if revoked:
        print(f"revoked {revoked} token(s) stored by an earlier npmguard login")
    if extra:
        print("the password is stored too, so tokens can be minted and rotated "
              "without asking")
    if _want_helpers(args.token_helper):
        for message in sync_token_helpers(user_config, secured_registries()):
            print(message)
    return 0


def _earlier_logins(
    nerf: str, store: CredentialStore
) -> dict[str, tuple[Secret, str | None]]:
    """Return the tokens earlier ``npmguard login`` runs stored, by vault name."""
    from npmguard.migrate import load_index

    found: dict[str, tuple[Secret, str | None]] = {}
    for name, meta in load_index().items():
        if meta.get("origin") != "login" or meta.get("registry") != nerf:
            continue
        value = store.get(name)
        if value is not None:
            key = meta.get("token_key")
            found[name] = (value, key if isinstance(key, str) else None)
    return found


def _revoke_quietly(
    provider: Provider, auth: Auth, target: Secret, info: TokenInfo | None, why: str
) -> bool:
    """Revoke ``target``; print why not, when the registry refuses."""
    from npmguard import audit
    from npmguard.registry.base import RegistryError

    try:
        provider.revoke(auth, target, info)
    except (RegistryError, OSError) as err:
        print(f"npmguard: could not revoke the token {target.fingerprint} ({why}): "
              f"{err}", file=sys.stderr)
        return False
    audit.note("revoked", registry=nerf_dart(provider.registry),
               fingerprint=target.fingerprint, reason=why)
    return True


def _log_in(
    provider: Provider, args: argparse.Namespace
) -> tuple[IssuedToken, Secret | None]:
    """Run the web or legacy flow; return the issued token and any password."""
    if not (args.legacy or args.username or args.password_stdin):
        try:
            return provider.web_login(_show_url), None
        except NotSupportedError as err:
            if args.web:
                raise
            print(f"npmguard: {err}", file=sys.stderr)
    elif args.web:
        raise UsageError("--web cannot be used with --username or --password-stdin")

    username = args.username or _prompt("Username: ")
    if not username:
        raise UsageError("a user name is needed: pass --username NAME")
    if args.password_stdin:
        password = _read_stdin_secret("password")
    else:
        password = Secret(_prompt("Password: ", hidden=True))
    otp = args.otp
    for _ in range(2):
        try:
            return provider.login(username, password, otp), password
        except OtpRequiredError:
            if otp is not None and not _interactive():
                raise
            otp = _prompt("One-time code from your authenticator: ")
            args.otp = otp
    raise LoginError("the registry did not accept the one-time code")


def _show_url(url: str) -> None:
    print(f"Open this page to log in: {url}", file=sys.stderr)
    print("Waiting for the login to finish...", file=sys.stderr)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _prompt(text: str, *, hidden: bool = False) -> str:
    if not _interactive():
        raise UsageError(
            "no terminal to ask on; pass --username and --password-stdin "
            "(and --otp when the registry wants a one-time code)"
        )
    if hidden:
        return getpass.getpass(text)
    sys.stderr.write(text)
    sys.stderr.flush()
    return sys.stdin.readline().strip()


def _read_stdin_secret(what: str) -> Secret:
    raw = sys.stdin.buffer.readline()
    try:
        value = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise UsageError(f"--{what}-stdin: the input is not UTF-8 text") from None
    if not value:
        raise UsageError(f"--{what}-stdin: no {what} on standard input")
    return Secret(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", metavar="URL",
                        help="registry to log in to (default: npm's registry setting)")
    parser.add_argument("--username", metavar="NAME", help="user name (legacy login)")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin")
    parser.add_argument("--token-stdin", action="store_true",
                        help="store a token made elsewhere, read from stdin")
    parser.add_argument("--otp", metavar="CODE", help="one-time code, if needed")
    flow = parser.add_mutually_exclusive_group()
    flow.add_argument("--web", action="store_true", help="only the browser flow")
    flow.add_argument("--legacy", action="store_true",
                      help="only the user name and password flow")
    parser.add_argument(
        "--store-password", action="store_true",
        help="keep the password in the vault so tokens can be minted and rotated "
             "without asking",
    )
    parser.add_argument(
        "--token-helper", choices=("auto", "always", "never"), default="auto",
        help="add a pnpm token helper to the user config (auto: when pnpm is on PATH)",
    )
