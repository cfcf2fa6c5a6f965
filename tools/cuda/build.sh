#!/usr/bin/env bash
# Builds CUDA binaries here (no GPU needed) for the H100/H200 machine, and packs them for it.
#
#   tools/cuda/build.sh                          cargo build --release -p train --features cudnn
#   tools/cuda/build.sh ARGS...                  cargo build --release ARGS...   (e.g. -p precompute -p train --features train/cudnn)
#   tools/cuda/build.sh --smoke                  the smoke test, tools/cuda/smoke (its own workspace)
#
# Every binary the build produced is written xz-compressed to .carry/bin/NAME.xz, with
# .carry/bin/BUILDINFO, and a fallback libcudart.so.13 to .carry/lib/ (.carry/ is git-ignored: ship
# it to the GPU machine and `source tools/cuda/gpu-env.sh` there).
# Environment: TAESD_CUDA_PREFIX (toolkit, default $HOME/.cache/taesd-cuda; set up by
# setup-toolkit.sh, which this runs first), TAESD_CUDA_TARGET_DIR (default REPO/target-cuda: keep it,
# a clean build is ~18 min on 2 cores), CUDA_COMPUTE_CAP (default 90 = H100/H200).
# cargo runs under `nice -n 19` so that it does not starve other work on a 2-core machine.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PREFIX=${TAESD_CUDA_PREFIX:-$HOME/.cache/taesd-cuda}
export CARGO_TARGET_DIR=${TAESD_CUDA_TARGET_DIR:-$REPO/target-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
CARRY=$REPO/.carry/bin

"$REPO/tools/cuda/setup-toolkit.sh" "$PREFIX" >&2
# shellcheck disable=SC1091
source "$PREFIX/env.sh"

manifest=()
if [[ ${1:-} == --smoke ]]; then
  shift
  manifest=(--manifest-path "$REPO/tools/cuda/smoke/Cargo.toml")
  # Start from the workspace's lock so that shared crates resolve to the same versions (and reuse
  # the artifacts already in the target dir).
  [[ -e $REPO/tools/cuda/smoke/Cargo.lock ]] || cp "$REPO/Cargo.lock" "$REPO/tools/cuda/smoke/Cargo.lock"
  args=("$@")
elif [[ $# -eq 0 ]]; then
  args=(-p train --features cudnn)
else
  args=("$@")
fi

msgs=$(mktemp)
trap 'rm -f "$msgs"' EXIT
echo "cargo build --release ${manifest[*]} ${args[*]}   (CARGO_TARGET_DIR=$CARGO_TARGET_DIR CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)" >&2
start=$(date +%s)
rc=0
nice -n 19 cargo build --release "${manifest[@]}" --message-format=json-render-diagnostics "${args[@]}" > "$msgs" || rc=$?
echo "build took $(( $(date +%s) - start )) s, exit $rc" >&2

# Executables this build produced (fresh or already up to date).
mapfile -t bins < <(python3 -c '
import json, sys
seen = set()
for line in open(sys.argv[1]):
    try: m = json.loads(line)
    except ValueError: continue
    exe = m.get("executable") if m.get("reason") == "compiler-artifact" else None
    if exe and "build-script" not in exe and exe not in seen:
        seen.add(exe); print(exe)
' "$msgs")
(( rc == 0 )) || { echo "cargo build failed (exit $rc)" >&2; exit "$rc"; }
(( ${#bins[@]} )) || { echo "the build produced no executable: nothing packed" >&2; exit 0; }

mkdir -p "$CARRY"
for exe in "${bins[@]}"; do
  name=$(basename "$exe")
  echo "== $name"
  # libcuda must be a bare NEEDED soname (the GPU machine's driver), never a path into this toolkit,
  # and nothing may carry an RPATH/RUNPATH into this machine's directories.
  dyn=$(readelf -d "$exe")
  echo "$dyn" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  needs \1/p'
  if echo "$dyn" | grep -qE '\((RPATH|RUNPATH)\)'; then
    echo "  ERROR: $name has an RPATH/RUNPATH:" >&2; echo "$dyn" | grep -E 'RPATH|RUNPATH' >&2; exit 1
  fi
  if echo "$dyn" | grep -E '\(NEEDED\)' | grep -q '/'; then
    echo "  ERROR: $name needs a library by path" >&2; exit 1
  fi
  glibc=$(objdump -T "$exe" | grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)
  echo "  newest glibc symbol version: $glibc"
  xz -T0 -6 -c "$exe" > "$CARRY/$name.xz.part"
  mv "$CARRY/$name.xz.part" "$CARRY/$name.xz"
  printf '  %s: %s bytes -> %s: %s bytes\n' "$exe" "$(stat -c %s "$exe")" ".carry/bin/$name.xz" "$(stat -c %s "$CARRY/$name.xz")"
  {
    echo "$name.xz  built $(date -u +%FT%TZ) from $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo '+dirty')"
    echo "  cargo build --release ${manifest[*]} ${args[*]}; nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    echo "  sha256 $(sha256sum "$exe" | cut -d' ' -f1) (uncompressed)"
  } > "$CARRY/$name.info"
done
cat "$CARRY"/*.info > "$CARRY/BUILDINFO"
# The binaries need libcudart.so.13 (candle-kernels links it). The GPU machine should have its own
# (PyTorch's CUDA 13 wheels, or the system); this 0.7 MB copy of the build's one is the fallback
# that gpu-env.sh uses only when neither has it.
mkdir -p "$REPO/.carry/lib"
cp -L "$CUDA_HOME/lib64/libcudart.so.13" "$REPO/.carry/lib/libcudart.so.13"
du -ch "$CARRY"/*.xz | sed 's/^/  /'
