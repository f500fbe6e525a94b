#!/usr/bin/env bash
# Builds the example policy plugins (C -> wasm32, no libc) into OUTDIR (default: this folder).
# Needs clang and lld (Debian: apt-get install clang lld).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
mkdir -p "$out"
for src in "$here"/*.c; do
    name="$(basename "$src" .c)"
    clang --target=wasm32 -nostdlib -O2 -Wall -Werror -Wl,--no-entry -o "$out/$name.wasm" "$src"
done
