#!/usr/bin/env bash
# Installs moto's server (the IAM and STS endpoint the tests and the demo talk to), pinned by
# MOTO_VERSION in hack/versions.env, into a per-version virtualenv outside the repo, and the AWS
# CLI (AWSCLI_VERSION) beside it, which the tests run against rendered Secrets. Idempotent:
# an installed, complete venv is reused. Prints the path of its `moto_server` executable last.
#
#   hack/moto.sh              install if missing, print the moto_server path
#   hack/moto.sh --path       only print the path (exit 1 if not installed)
#   hack/moto.sh --aws-path   only print the path of the venv's `aws` (exit 1 if not installed)
#
# Environment: IKO_TOOLS_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/iam-key-operator),
# IKO_PYTHON (the interpreter the venv is made from; default python3, needs >= 3.9).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${IKO_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/iam-key-operator}
venv="$cache/moto-$MOTO_VERSION"
server="$venv/bin/moto_server"
# Written last, only after a complete install: a half-made venv is never taken as installed.
marker="$venv/.installed"
aws="$venv/bin/aws"
aws_marker="$venv/.awscli-$AWSCLI_VERSION"

log() { echo "moto: $*" >&2; }
die() { echo "moto: error: $*" >&2; exit 1; }

installed() { [ -f "$marker" ] && [ -x "$server" ] && [ -x "$venv/bin/python" ]; }
aws_installed() { [ -f "$aws_marker" ] && [ -x "$aws" ]; }

# Into an installed venv: pip keeps moto's botocore, which this AWS CLI version requires.
install_awscli() {
  log "installing awscli==$AWSCLI_VERSION from PyPI into $venv"
  "$venv/bin/python" -m pip install --quiet "awscli==$AWSCLI_VERSION" >&2 \
    || die "pip could not install awscli==$AWSCLI_VERSION (is PyPI reachable?)"
  [ -x "$aws" ] || die "awscli installed but $aws is missing"
  touch "$aws_marker"
}

if [ "${1:-}" = "--path" ]; then
  installed || die "moto $MOTO_VERSION is not installed: run hack/moto.sh (or make tools)"
  echo "$server"; exit 0
fi
if [ "${1:-}" = "--aws-path" ]; then
  installed && aws_installed || die "awscli $AWSCLI_VERSION is not installed: run hack/moto.sh (or make tools)"
  echo "$aws"; exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--path]"

mkdir -p "$cache"
# One installer at a time (make tools and a test run may both ask).
exec 9>"$cache/.moto-$MOTO_VERSION.lock"
if command -v flock >/dev/null; then flock 9; fi

if installed; then
  log "moto $MOTO_VERSION already installed in $venv"
  aws_installed || install_awscli
  echo "$server"; exit 0
fi

python=${IKO_PYTHON:-python3}
command -v "$python" >/dev/null || die "$python not found: install Python >= 3.9 (or set IKO_PYTHON)"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
  || die "$python is $("$python" --version 2>&1); moto $MOTO_VERSION needs Python >= 3.9"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
  || die "$python has no venv/ensurepip module (Debian: apt-get install python3-venv)"

rm -rf "$venv"
log "creating virtualenv $venv ($("$python" --version 2>&1))"
"$python" -m venv "$venv" || { rm -rf "$venv"; die "could not create the virtualenv $venv"; }
log "installing moto[server]==$MOTO_VERSION from PyPI (about a minute)"
if ! "$venv/bin/python" -m pip install --quiet "moto[server]==$MOTO_VERSION" >&2; then
  rm -rf "$venv"
  die "pip could not install moto[server]==$MOTO_VERSION (is PyPI reachable?)"
fi
[ -x "$server" ] || { rm -rf "$venv"; die "moto installed but $server is missing"; }
got=$("$venv/bin/python" -c 'import moto; print(moto.__version__)') \
  || { rm -rf "$venv"; die "moto installed but cannot be imported"; }
[ "$got" = "$MOTO_VERSION" ] || { rm -rf "$venv"; die "pip installed moto $got, wanted $MOTO_VERSION"; }
touch "$marker"
log "moto $MOTO_VERSION installed"
install_awscli
echo "$server"
