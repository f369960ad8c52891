"""SIGKILL ``npmguard rotate`` at every step, then check what the next run does.

Each case logs in to the real Verdaccio, so the stored token was made by
the token API and can be revoked. Then it runs ``npmguard rotate`` in a
child through a fault injection fake. The fake SIGKILLs the child the N-th
time it reaches one step: a registry call, a keychain write, a journal
write, the index write. After the kill:

- the token stored under the credential's name works at the registry
  (a rotation never leaves the user without a working token);
- ``npmguard rotate --due`` (recovery only, nothing is due) finishes or
  undoes the rotation: no journal entry, no ``#next``/``#old`` copies,
  the stored token still works, and when it is a new one the old token is
  refused by the registry;
- no file holds a token.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import realparts

from npmguard.migrate import load_index
from npmguard.rotation import pending_rotations
from tests.npmcli import NPMGUARD, files_containing, run

pytestmark = pytest.mark.usefixtures("keyring_bus")

FAULT_INJECTION_WRAPPER = r"""
import os
import signal
import sys

point, count = sys.argv[1], int(sys.argv[2])
args = sys.argv[3:]

from npmguard import cli, rotation
from npmguard.registry import npmapi
from npmguard.vault import keychain

hits = {}


def hit(name):
    hits[name] = hits.get(name, 0) + 1
    if name == point and hits[name] == count:
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, attr, label):
    real = getattr(owner, attr)

    def fake(*a, **k):
        name = label(*a, **k) if callable(label) else label
        hit(name + ":before")
        result = real(*a, **k)
        hit(name + ":after")
        return result

    setattr(owner, attr, fake)


wrap(npmapi.NpmTokenApi, "replace", "registry.replace")
wrap(npmapi.NpmTokenApi, "whoami", "registry.whoami")
wrap(npmapi.NpmTokenApi, "revoke", "registry.revoke")
wrap(keychain.KeychainStore, "set", "vault.set")
wrap(keychain.KeychainStore, "delete", "vault.delete")
wrap(rotation, "_write", lambda record: "journal:" + record["phase"])
wrap(rotation, "_drop", "journal.drop")
wrap(rotation, "save_index", "index")
sys.exit(cli.main(args))
"""

# Every step of one rotation, in order, as (point, occurrence).
POINTS = [
    ("journal:creating:before", 1),
    ("journal:creating:after", 1),
    ("registry.replace:before", 1),
    ("registry.replace:after", 1),
    ("vault.set:before", 1),
    ("vault.set:after", 1),
    ("journal:created:before", 1),
    ("journal:created:after", 1),
    ("registry.whoami:before", 1),
    ("registry.whoami:after", 1),
    ("vault.set:before", 2),
    ("vault.set:after", 2),
    ("vault.set:before", 3),
    ("vault.set:after", 3),
    ("journal:stored:before", 1),
    ("journal:stored:after", 1),
    ("registry.revoke:before", 1),
    ("registry.revoke:after", 1),
    ("journal:revoked:before", 1),
    ("journal:revoked:after", 1),
    ("index:before", 1),
    ("index:after", 1),
    ("vault.delete:before", 1),
    ("vault.delete:after", 2),
    ("journal.drop:before", 1),
]


def _login(verdaccio: realparts.Verdaccio, home: Path) -> tuple[str, str]:
    user, password = f"rc-{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
    verdaccio.add_user(user, password)
    result = run(
        [*NPMGUARD, "login", "--registry", verdaccio.url, "--username", user,
         "--password-stdin", "--store-password", "--token-helper", "never"],
        home, stdin=password + "\n",
    )
    assert result.returncode == 0, result.stderr
    (name,) = [n for n, e in load_index().items() if e.get("origin") == "login"]
    return user, name


def _works(verdaccio: realparts.Verdaccio, token: str, user: str) -> bool:
    try:
        return verdaccio.whoami(token) == user
    except realparts.HttpError:
        return False


def _killed_rotate(home: Path, url: str, point: str, count: int) -> int:
    child = subprocess.run(
        [sys.executable, "-c", FAULT_INJECTION_WRAPPER, point, str(count),
         "rotate", "--registry", url],
        cwd=home, env=dict(os.environ), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, check=False,
    )
    # Shown by pytest only when the test fails.
    print(child.stdout, child.stderr)
    return child.returncode


@pytest.mark.parametrize(
    ("point", "count"), POINTS, ids=[f"{p}#{n}" for p, n in POINTS]
)
def test_rotate_killed_at(point: str, count: int, home: Path, verdaccio) -> None:  # type: ignore[no-untyped-def]
    from npmguard.vault import open_default_store

    user, name = _login(verdaccio, home)
    store = open_default_store()
    old = store.get(name)
    assert old is not None

    code = _killed_rotate(home, verdaccio.url, point, count)

    assert code == -9, f"the child was not killed at {point} (exit {code})"
    in_use = store.get(name)
    assert in_use is not None
    assert _works(verdaccio, in_use.reveal(), user)

    recovery = run([*NPMGUARD, "rotate", "--due"], home)

    assert recovery.returncode == 0, recovery.stdout + recovery.stderr
    assert "Traceback" not in recovery.stderr
    assert pending_rotations() == []
    assert store.get(name + "#next") is None
    assert store.get(name + "#old") is None
    final = store.get(name)
    assert final is not None
    assert _works(verdaccio, final.reveal(), user)
    if final != old:
        assert not _works(verdaccio, old.reveal(), user)
        assert load_index()[name]["fingerprint"] == final.fingerprint
    assert files_containing(home, final.reveal()) == []
    assert files_containing(home, old.reveal()) == []
