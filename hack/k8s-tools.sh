#!/usr/bin/env bash
# Builds the real Kubernetes parts from the Go module proxy into a per-version cache outside the
# repo: kube-apiserver, kube-controller-manager, kubectl (k8s.io/kubernetes), etcd and helm.
# Idempotent: a binary already built for its version is skipped. Prints the bin directory last.
#
#   hack/k8s-tools.sh          build what is missing, print the bin dir
#   hack/k8s-tools.sh --path   only print the bin dir (exit 1 if something is missing)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${IKO_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/iam-key-operator}
bin="$cache/bin/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
k8s_bins=(kube-apiserver kube-controller-manager kubectl)

log() { echo "k8s-tools: $*" >&2; }
die() { echo "k8s-tools: error: $*" >&2; exit 1; }

missing() {
  local b
  for b in "${k8s_bins[@]}" etcd helm; do [ -x "$bin/$b" ] || { echo "$b"; }; done
}

if [ "${1:-}" = "--path" ]; then
  [ -z "$(missing)" ] || die "tools not built yet: run hack/k8s-tools.sh"
  echo "$bin"; exit 0
fi

command -v go >/dev/null || die "go is not installed (need Go >= 1.26 for Kubernetes $KUBERNETES_VERSION)"
mkdir -p "$bin" "$cache/src"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOWORK=off

# A wrapper module per tool: sharing one would let Go's version selection raise a dependency
# above what that tool pinned.
new_module() { # dir name
  rm -rf "$1"; mkdir -p "$1"
  printf 'module keyop.local/%s\n\ngo 1.26\n' "$2" >"$1/go.mod"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION minor=${KUBERNETES_VERSION#v1.} dir="$cache/src/kubernetes-$KUBERNETES_VERSION"
  local staging_v="v0.$minor" gomod b
  for b in "${k8s_bins[@]}"; do [ -x "$bin/$b" ] || break; done
  if [ -x "$bin/$b" ]; then log "kubernetes $v already built"; return; fi
  log "downloading k8s.io/kubernetes@$v (module proxy)"
  # Outside any module, so the half-built wrapper cannot interfere.
  gomod=$(cd "$cache" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$v"
  new_module "$dir" k8s-tools
  # Kubernetes' go.mod requires its staging modules at v0.0.0 and replaces them with ./staging
  # paths; a consumer must point each one at its published v0.N.M instead.
  local mods
  mods=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/.*#\1#p' "$gomod")
  [ -n "$mods" ] || die "no staging replaces found in $gomod"
  {
    echo "require k8s.io/kubernetes $v"
    for m in $mods; do echo "replace $m => $m $staging_v"; done
  } >>"$dir/go.mod"
  log "$(echo "$mods" | wc -l) staging modules pinned at $staging_v"
  local ldflags="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor%%.*}"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  local b
  for b in "${k8s_bins[@]}"; do
    [ -x "$bin/$b" ] && { log "$b $v already built"; continue; }
    log "building $b $v (first build takes a while on 2 cores)"
    (cd "$dir" && go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$bin/$b.tmp" "k8s.io/kubernetes/cmd/$b") \
      || die "building $b failed"
    mv "$bin/$b.tmp" "$bin/$b"
  done
}

build_etcd() {
  [ -x "$bin/etcd" ] && { log "etcd $ETCD_VERSION already built"; return; }
  local dir="$cache/src/etcd-$ETCD_VERSION"
  new_module "$dir" etcd-tools
  echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION" >>"$dir/go.mod"
  log "building etcd $ETCD_VERSION"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3) \
    || die "building etcd failed"
  mv "$bin/etcd.tmp" "$bin/etcd"
}

build_helm() {
  [ -x "$bin/helm" ] && { log "helm $HELM_VERSION already built"; return; }
  local major=${HELM_VERSION%%.*}
  log "building helm $HELM_VERSION"
  local gobin="$cache/src/helm-$HELM_VERSION"
  mkdir -p "$gobin"
  GOFLAGS= GOBIN="$gobin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/$major/cmd/helm@$HELM_VERSION" || die "building helm failed"
  mv "$gobin/helm" "$bin/helm"
}

build_etcd
build_helm
build_kubernetes
"$bin/kube-apiserver" --version >&2
"$bin/etcd" --version | sed -n 1p >&2  # sed reads it all: head could end etcd with SIGPIPE (exit 141)
"$bin/helm" version --short >&2
echo "$bin"
