#!/usr/bin/env bash
# The project's test command: bash tests/run.sh [PYTEST ARGS...]
#
# On a Debian machine, as root, it first installs whatever the tests need and
# is missing. That is the Debian packages for the keychain, the virtual
# display and the session bus, then Verdaccio and pnpm from the npm registry
# into a cache dir, then a .venv in the repository with the package and its
# test extras. Then it runs pytest with a JUnit report and a copy of the
# output in test-reports/, and fails when the run's canary token is in either.
#
# Knobs: NPMGUARD_TEST_CACHE (default ~/.cache/npmguard-test) holds the Node
# tools; NPMGUARD_TEST_NODE_BIN, when it already has the right verdaccio and
# pnpm, is used as is; PYTHON picks the interpreter for a new .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[tests/run.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

VERDACCIO_VERSION=6.8.0
# Newer Verdaccio and pnpm releases need Node 22, and the machines have Node 20.
PNPM_RANGE=10
APT_PACKAGES=(gnome-keyring xvfb libnotify-bin dbus systemd shellcheck)

apt_install() {
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: $*; install them as root"
  command -v apt-get >/dev/null || die "missing packages $* and no apt-get to install them"
  if [ -z "${APT_UPDATED:-}" ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# --- 1. Debian packages ------------------------------------------------------
missing=()
if command -v dpkg-query >/dev/null; then
  for pkg in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
  done
else
  for prog in gnome-keyring-daemon Xvfb notify-send dbus-daemon; do
    command -v "$prog" >/dev/null || die "$prog is missing and this is not a Debian system"
  done
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

# --- 2. Node tools -----------------------------------------------------------
tools_ok() {
  local bin="$1"
  [ -x "$bin/verdaccio" ] && [ -x "$bin/pnpm" ] || return 1
  [ "$("$bin/verdaccio" --version 2>/dev/null)" = "v$VERDACCIO_VERSION" ] || return 1
  case "$("$bin/pnpm" --version 2>/dev/null)" in "$PNPM_RANGE".*) ;; *) return 1 ;; esac
}
if [ -n "${NPMGUARD_TEST_NODE_BIN:-}" ] && tools_ok "$NPMGUARD_TEST_NODE_BIN"; then
  log "Node tools from NPMGUARD_TEST_NODE_BIN=$NPMGUARD_TEST_NODE_BIN"
else
  CACHE="${NPMGUARD_TEST_CACHE:-$HOME/.cache/npmguard-test}"
  NODE_DIR="$CACHE/node"
  if ! tools_ok "$NODE_DIR/node_modules/.bin"; then
    command -v npm >/dev/null || die "npm is needed to install verdaccio and pnpm"
    log "installing verdaccio@$VERDACCIO_VERSION and pnpm@$PNPM_RANGE into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    [ -f "$NODE_DIR/package.json" ] || printf '{"private": true}\n' > "$NODE_DIR/package.json"
    # An empty user config of its own: the install must not depend on, or
    # read, the credentials in the user's ~/.npmrc.
    : > "$NODE_DIR/npmrc"
    npm install --prefix "$NODE_DIR" --userconfig "$NODE_DIR/npmrc" \
      --cache "$CACHE/npm-cache" --no-audit --no-fund --update-notifier=false \
      --loglevel=error "verdaccio@$VERDACCIO_VERSION" "pnpm@$PNPM_RANGE"
    tools_ok "$NODE_DIR/node_modules/.bin" || die "verdaccio or pnpm did not install in $NODE_DIR"
  fi
  export NPMGUARD_TEST_NODE_BIN="$NODE_DIR/node_modules/.bin"
fi

# --- 3. Python virtual environment ---------------------------------------------
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  command -v "$PY" >/dev/null || die "$PY not found; set PYTHON to a Python 3.10+"
  if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3-venv
  fi
  log "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
# Reinstall when pyproject.toml changes, so new dependencies arrive.
stamp=.venv/.npmguard-test-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  log "installing the package and its test extras into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  printf '%s\n' "$want" > "$stamp"
fi

# --- 4. pytest -----------------------------------------------------------------
# The canary is made here and handed down, so it is never written to a file
# that the sweep below would find.
NPMGUARD_CANARY="$(.venv/bin/python -c 'import secrets, string
a = string.ascii_letters + string.digits
print("npm_" + "".join(secrets.choice(a) for _ in range(36)))')"
export NPMGUARD_CANARY

mkdir -p test-reports
rm -f test-reports/junit.xml test-reports/pytest.log
set +e
.venv/bin/python -m pytest --junitxml=test-reports/junit.xml "$@" 2>&1 \
  | tee test-reports/pytest.log
rc=${PIPESTATUS[0]}
set -e

leaks="$(grep -rlF -- "$NPMGUARD_CANARY" test-reports/ || true)"
if [ -n "$leaks" ]; then
  log "CANARY LEAK: the run's canary token is in plaintext in:"
  printf '%s\n' "$leaks" | sed 's/^/  /' >&2
  [ "$rc" -ne 0 ] || rc=1
fi
if [ "$rc" -eq 5 ]; then
  log "pytest collected no tests; that counts as a failure"
fi
exit "$rc"
