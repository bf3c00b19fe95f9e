#!/usr/bin/env bash
# Provides a Lua 5.1 interpreter for tests/e2e/argocd.rs: Argo CD runs resource health checks and
# actions with gopher-lua, which implements Lua 5.1, so the scripts in argocd/ are tested with 5.1.
# Installs Debian's `lua5.1` package when none is found (needs root, as on CI). Prints the
# interpreter's path last.
#
#   hack/lua.sh          install if missing, print the path
#   hack/lua.sh --path   only print the path (exit 1 if there is none)
#
# Environment: IKO_LUA (an interpreter to use instead, e.g. a Homebrew `lua@5.1`).
set -euo pipefail

log() { echo "lua: $*" >&2; }
die() { echo "lua: error: $*" >&2; exit 1; }

is_51() { "$1" -v 2>&1 | grep -q '^Lua 5\.1\.'; }

find_lua() {
  local candidate
  for candidate in ${IKO_LUA:-} lua5.1 lua-5.1 lua51 lua; do
    candidate=$(command -v "$candidate" 2>/dev/null) || continue
    if is_51 "$candidate"; then echo "$candidate"; return 0; fi
  done
  return 1
}

if [ "${1:-}" = "--path" ]; then
  find_lua || die "no Lua 5.1 interpreter found: run hack/lua.sh (or make tools), or set IKO_LUA"
  exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--path]"

if found=$(find_lua); then
  log "$("$found" -v 2>&1) at $found"
  echo "$found"; exit 0
fi
if [ -n "${IKO_LUA:-}" ]; then
  die "IKO_LUA=$IKO_LUA is not a Lua 5.1 interpreter"
fi

command -v apt-get >/dev/null \
  || die "no Lua 5.1 found and no apt-get: install Lua 5.1 (e.g. brew install lua@5.1) and set IKO_LUA"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "installing lua5.1 with apt-get needs root (or sudo)"
  sudo=(sudo)
fi
log "installing Debian's lua5.1"
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists yet.
if ! apt-cache show lua5.1 >/dev/null 2>&1; then
  "${sudo[@]}" apt-get update -qq >&2 || die "apt-get update failed"
fi
"${sudo[@]}" apt-get install -y -qq lua5.1 >&2 || die "apt-get install lua5.1 failed"
found=$(find_lua) || die "lua5.1 installed, but no Lua 5.1 interpreter is on PATH"
log "$("$found" -v 2>&1) at $found"
echo "$found"
