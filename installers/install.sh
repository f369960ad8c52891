#!/bin/sh
# Install npmguard for the current user and start its user service; no root.
#
#   sh installers/install.sh [--from PATH_OR_SPEC] [--venv | --pipx]
#                            [--no-service] [--uninstall [--force]]
#
# With pipx on PATH, npmguard is installed with `pipx install`. Otherwise it
# goes into a venv in ${XDG_DATA_HOME:-~/.local/share}/npmguard/venv, linked
# as ~/.local/bin/npmguard. Then `npmguard service install` sets up the user
# service. Running it again upgrades in place; --uninstall reverses it.
#
# Knobs: PYTHON picks the interpreter for the venv (default python3).
set -eu

PROG=npmguard-install

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}
usage_error() {
  printf '%s: error: %s (see --help)\n' "$PROG" "$*" >&2
  exit 2
}

usage() {
  cat <<'EOF'
usage: install.sh [--from PATH_OR_SPEC] [--venv | --pipx] [--no-service]
       install.sh --uninstall [--force]

Install npmguard for this user and start its user service (no root needed).

  --from PATH_OR_SPEC  what to install: a source directory, a wheel, or a pip
                       requirement such as npmguard==0.1.0 (default: the
                       checkout this script is in)
  --venv               install into a venv even when pipx is available
  --pipx               install with pipx (fail if it is missing)
  --no-service         do not run `npmguard service install`
  --uninstall          stop the service and remove what this script installed
  --force              uninstall even though npmguard still holds credentials
  -h, --help           show this help

The venv is ${XDG_DATA_HOME:-~/.local/share}/npmguard/venv and the command is
linked as ~/.local/bin/npmguard. PYTHON picks the interpreter (python3).
EOF
}

SOURCE=""
METHOD=auto
ACTION=install
SERVICE=1
FORCE=0
while [ $# -gt 0 ]; do
  case $1 in
    --from)
      [ $# -ge 2 ] || usage_error "--from needs a path or a pip requirement"
      SOURCE=$2
      shift 2
      ;;
    --from=*)
      SOURCE=${1#--from=}
      shift
      ;;
    --venv) METHOD=venv; shift ;;
    --pipx) METHOD=pipx; shift ;;
    --no-service) SERVICE=0; shift ;;
    --uninstall) ACTION=uninstall; shift ;;
    --force) FORCE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown option: $1" ;;
  esac
done

[ -n "${HOME:-}" ] || die "HOME is not set"
DATA_HOME=${XDG_DATA_HOME:-$HOME/.local/share}
STATE_HOME=${XDG_STATE_HOME:-$HOME/.local/state}
APP_DIR=$DATA_HOME/npmguard
VENV=$APP_DIR/venv
BIN_DIR=$HOME/.local/bin
LINK=$BIN_DIR/npmguard
# Records how npmguard was installed, so that --uninstall undoes that.
MARKER=$APP_DIR/installed-with
PYTHON=${PYTHON:-python3}

script_dir() {
  CDPATH='' cd -- "$(dirname -- "$0")" && pwd
}

# --- install -------------------------------------------------------------------

resolve_source() {
  if [ -z "$SOURCE" ]; then
    repo=$(dirname -- "$(script_dir)")
    [ -f "$repo/pyproject.toml" ] ||
      die "no --from given, and $repo (where this script is) is not an npmguard checkout"
    SOURCE=$repo
  fi
  # pip reads a bare word as a package name: make a local path absolute.
  if [ -d "$SOURCE" ]; then
    [ -f "$SOURCE/pyproject.toml" ] ||
      die "$SOURCE is a directory without a pyproject.toml, not an npmguard source tree"
    SOURCE=$(CDPATH='' cd -- "$SOURCE" && pwd)
  elif [ -f "$SOURCE" ]; then
    SOURCE=$(CDPATH='' cd -- "$(dirname -- "$SOURCE")" && pwd)/$(basename -- "$SOURCE")
  fi
}

previous_method() {
  if [ -f "$MARKER" ]; then
    cat "$MARKER"
  fi
}

choose_method() {
  previous=$(previous_method)
  case $METHOD in
    pipx)
      command -v pipx >/dev/null 2>&1 || die "--pipx given, but pipx is not on PATH"
      ;;
    auto)
      # Stay with what an earlier run used, so that a rerun upgrades it.
      if [ -n "$previous" ]; then
        METHOD=$previous
      elif command -v pipx >/dev/null 2>&1; then
        METHOD=pipx
      else
        METHOD=venv
      fi
      ;;
  esac
  if [ -n "$previous" ] && [ "$previous" != "$METHOD" ]; then
    die "npmguard was installed with $previous before; run this script with --uninstall first"
  fi
}

install_pipx() {
  say "installing $SOURCE with pipx"
  pipx install --force "$SOURCE" || die "pipx install failed (its output is above)"
  bin_dir=$(pipx environment --value PIPX_BIN_DIR 2>/dev/null || true)
  NPMGUARD=${bin_dir:-$BIN_DIR}/npmguard
  [ -x "$NPMGUARD" ] || NPMGUARD=$(command -v npmguard || true)
  [ -n "$NPMGUARD" ] || die "pipx installed npmguard, but its command is not found"
}

install_venv() {
  command -v "$PYTHON" >/dev/null 2>&1 ||
    die "$PYTHON not found; install Python 3.10 or newer, or set PYTHON"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$PYTHON is older than Python 3.10; set PYTHON to a newer one"
  if [ -e "$LINK" ] || [ -L "$LINK" ]; then
    if [ "$(readlink "$LINK" 2>/dev/null || true)" != "$VENV/bin/npmguard" ]; then
      die "$LINK exists and is not the link this script makes; move it away first"
    fi
  fi
  mkdir -p "$APP_DIR"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating a venv in $VENV"
    "$PYTHON" -m venv "$VENV" ||
      die "could not create a venv (on Debian and Ubuntu: apt install python3-venv)"
  fi
  say "installing $SOURCE into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --upgrade "$SOURCE" || die "pip install failed (its output is above)"
  [ -x "$VENV/bin/npmguard" ] || die "pip did not install the npmguard command into $VENV/bin"
  mkdir -p "$BIN_DIR"
  ln -sfn "$VENV/bin/npmguard" "$LINK"
  NPMGUARD=$LINK
}

do_install() {
  resolve_source
  choose_method
  case $METHOD in
    pipx) install_pipx ;;
    venv) install_venv ;;
  esac
  printf '%s\n' "$METHOD" >"$MARKER.tmp" && mv -f "$MARKER.tmp" "$MARKER"
  version=$("$NPMGUARD" --version) || die "$NPMGUARD does not run"
  say "installed $version as $NPMGUARD"
  if [ "$SERVICE" -eq 1 ]; then
    # Exits 0 when the unit is written, even if it cannot be started now, and
    # then prints the reason on stderr.
    "$NPMGUARD" service install || die "npmguard service install failed"
  fi
  case ":${PATH:-}:" in
    *":$(dirname -- "$NPMGUARD"):"*) ;;
    *)
      warn "$(dirname -- "$NPMGUARD") is not on your PATH; add it, e.g." \
        "export PATH=\"$(dirname -- "$NPMGUARD"):\$PATH\" in your shell profile"
      ;;
  esac
  say "done; run \`npmguard doctor\` to check the setup"
}

# --- uninstall -----------------------------------------------------------------

holds_credentials() {
  index=${NPMGUARD_STATE_DIR:-$STATE_HOME/npmguard}/credentials.json
  [ -s "$index" ] || return 1
  [ "$(tr -d ' \t\r\n' <"$index")" != "{}" ]
}

do_uninstall() {
  method=$(previous_method)
  if [ -z "$method" ] && [ ! -L "$LINK" ] && [ ! -d "$VENV" ]; then
    say "nothing to uninstall: this script has not installed npmguard here"
    exit 0
  fi

  if holds_credentials && [ "$FORCE" -ne 1 ]; then
    die "npmguard still holds credentials it took out of .npmrc files; run \`npmguard restore\` to put them back first, or pass --force (they stay in the keychain)"
  fi
  NPMGUARD=""
  if [ -x "$LINK" ]; then
    NPMGUARD=$LINK
  elif [ "$method" = pipx ]; then
    NPMGUARD=$(command -v npmguard || true)
  fi
  if [ -n "$NPMGUARD" ]; then
    "$NPMGUARD" service uninstall || warn "npmguard service uninstall failed; remove the unit by hand"
  else
    warn "npmguard is not runnable; its user service (if any) was left in place"
  fi

  if [ "$method" = pipx ]; then
    command -v pipx >/dev/null 2>&1 || die "npmguard was installed with pipx, which is gone"
    pipx uninstall npmguard || die "pipx uninstall failed"
  fi
  if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$VENV/bin/npmguard" ]; then
    rm -f "$LINK"
    say "removed $LINK"
  fi
  if [ -f "$VENV/pyvenv.cfg" ]; then
    rm -rf "$VENV"
    say "removed $VENV"
  fi
  rm -f "$MARKER"
  # The data dir may hold pnpm token helpers and other state; keep it unless
  # nothing is left in it.
  rmdir "$APP_DIR" 2>/dev/null || true
  say "npmguard is uninstalled"
}

case $ACTION in
  install) do_install ;;
  uninstall) do_uninstall ;;
esac
