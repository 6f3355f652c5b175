#!/usr/bin/env bash
# Builds, on this machine, everything the GPU device check needs and puts it in one folder
# (devcheck/, git-ignored, at most 64 MiB): the release `pagemesh` binary, the GPU kernel test
# executable (`cargo test --no-run`; the device has no Rust toolchain), nats-server, and the
# stories260K model with its reference. Then checks that the binaries need no newer glibc than
# the device image's (Ubuntu 24.04: glibc 2.39).
#
#   bash kernels/build-device-check.sh            # then: kernels/device-check.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=devcheck
MODEL=${PAGEMESH_STORIES:-models/stories260K}
MAX_GLIBC=${PAGEMESH_DEVICE_GLIBC:-2.39}
LIMIT_MIB=60

cargo build --release --locked -p pagemesh
tests_json=$(cargo test --release --locked -p pagemesh-executor --test gpu_kernels --no-run --message-format=json)
kernel_tests=$(printf '%s\n' "$tests_json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu_kernels":
        print(m["executable"])')
[ -x "$kernel_tests" ] || { echo "gpu_kernels test executable not found" >&2; exit 1; }

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR/models"
cp target/release/pagemesh "$OUT_DIR/pagemesh"
cp "$kernel_tests" "$OUT_DIR/gpu_kernels"
strip "$OUT_DIR/pagemesh" "$OUT_DIR/gpu_kernels"
cp "$(command -v nats-server)" "$OUT_DIR/nats-server"
cp -r "$MODEL" "$OUT_DIR/models/stories260K"
git describe --always --dirty > "$OUT_DIR/commit"

# The newest glibc symbol version each binary needs, against the device image's.
for bin in pagemesh gpu_kernels nats-server; do
  need=$(objdump -T "$OUT_DIR/$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
  if [ "$(printf '%s\n%s\n' "$need" "$MAX_GLIBC" | sort -V | tail -1)" != "$MAX_GLIBC" ]; then
    echo "$bin needs glibc $need, newer than the device's $MAX_GLIBC" >&2
    exit 1
  fi
  echo "$bin: needs glibc $need (device: $MAX_GLIBC)"
done

size_mib=$(du -sm "$OUT_DIR" | cut -f1)
echo "devcheck/: ${size_mib} MiB (limit ${LIMIT_MIB})"
[ "$size_mib" -le "$LIMIT_MIB" ] || { echo "devcheck/ is over ${LIMIT_MIB} MiB" >&2; exit 1; }
