#!/usr/bin/env bash
# Builds the operator exactly as the image ships it: release profile, static, for this machine's
# musl target (the allocator is the binary's own, see src/main.rs). The Dockerfile and `make bench`
# both build through here, so the benchmarks measure what ships. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."

target="$(uname -m)-unknown-linux-musl"

# aws-lc-sys compiles C for the target: it needs musl-gcc (Debian's musl-tools).
if ! command -v musl-gcc >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing musl-tools (musl-gcc) with apt-get" >&2
  $sudo apt-get update >&2
  $sudo apt-get install -y --no-install-recommends musl-tools >&2
fi
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target" >&2
fi

cargo build --release --locked --target "$target" --bin iam-key-operator >&2

bin="${CARGO_TARGET_DIR:-target}/$target/release/iam-key-operator"
# distroless/static has no libc: anything but a static binary would not start there. (ldd
# answers "statically linked" for a static-pie binary, and "not a dynamic executable" for others.)
if ! ldd "$bin" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; then
  echo "$bin is not static" >&2
  exit 1
fi
echo "$bin"
