#!/usr/bin/env bash
# `make dev-down`: stop whatever `make dev-up` and `make demo` started, whatever state it is in
# (operator already exited, testenv binary not built, half-started environment). Never fails
# because something is already gone.
set -uo pipefail
cd "$(dirname "$0")/.."
dev=${DEV_DIR:-$PWD/.dev}

stop() { # pid what
  kill -0 "$1" 2>/dev/null || return 0
  kill "$1" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done
  echo "dev-down: $2 (pid $1) ignored SIGTERM for 10 s: SIGKILL" >&2
  kill -9 "$1" 2>/dev/null
  return 0
}

if [ -f "$dev/operator.pid" ]; then
  stop "$(cat "$dev/operator.pid")" operator
  rm -f "$dev/operator.pid"
fi
if [ -x target/debug/testenv ]; then
  target/debug/testenv down --state-dir "$dev" || echo "dev-down: testenv down failed; stopping what is left" >&2
fi
# Whatever testenv could not stop (or when it is not built): every process of $dev/pids that is
# still the program it was started as.
if [ -f "$dev/pids" ]; then
  while read -r pid name; do
    [ -n "${pid:-}" ] || continue
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"; then
      stop "$pid" "$name"
    fi
  done <"$dev/pids"
  rm -f "$dev/pids" "$dev/env"
fi
exit 0
