#!/usr/bin/env bash
# Builds hack/argocd-lua (Argo CD's Lua interpreter for tests/e2e/argocd.rs: gopher-lua with the
# libraries and globals Argo CD gives resource customization scripts) from the Go module proxy
# into a cache outside the repo. The binary's directory is named after GOPHER_LUA_VERSION and a
# hash of the program's sources, so a changed program is rebuilt and an unchanged one never is.
# Prints the binary's path last.
#
#   hack/argocd-lua.sh          build if missing, print the path
#   hack/argocd-lua.sh --path   only print the path (exit 1 if not built for these sources)
#
# Environment: IKO_TOOLS_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/iam-key-operator).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
src="$here/argocd-lua"

cache=${IKO_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/iam-key-operator}

log() { echo "argocd-lua: $*" >&2; }
die() { echo "argocd-lua: error: $*" >&2; exit 1; }

# The version go.mod requires of a module (either require form).
required() {
  awk -v m="$1" '$1 == "require" { $1 = "" ; $0 = $0 } $1 == m { print $2 }' "$src/go.mod"
}
check_pin() { # module version
  [ "$(required "$1")" = "$2" ] || die "hack/argocd-lua/go.mod requires $1 $(required "$1"), hack/versions.env says $2: \
run (cd hack/argocd-lua && go get $1@$2 && go mod tidy)"
}
check_pin github.com/yuin/gopher-lua "$GOPHER_LUA_VERSION"
check_pin layeh.com/gopher-json "$GOPHER_JSON_VERSION"

sources_hash=$(cd "$src" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-12)
bin="$cache/bin/argocd-lua-gopher-lua-$GOPHER_LUA_VERSION-$sources_hash/argocd-lua"

if [ "${1:-}" = "--path" ]; then
  [ -x "$bin" ] || die "not built for the current sources: run hack/argocd-lua.sh (or make tools)"
  echo "$bin"; exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--path]"

if [ -x "$bin" ]; then
  log "gopher-lua $GOPHER_LUA_VERSION already built at $bin"
  echo "$bin"; exit 0
fi
command -v go >/dev/null || die "go is not installed (need Go >= 1.26)"
mkdir -p "$(dirname "$bin")"
log "building with gopher-lua $GOPHER_LUA_VERSION (module proxy)"
# -mod=readonly: go.mod and go.sum are the pins; nothing is resolved anew.
(cd "$src" && CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w" -o "$bin.tmp.$$" .) \
  || die "building hack/argocd-lua failed"
mv "$bin.tmp.$$" "$bin"
log "built $bin"
echo "$bin"
