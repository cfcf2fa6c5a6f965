#!/usr/bin/env bash
# Builds tools/cuda/kprof (a CUPTI kernel profiler injected with CUDA_INJECTION64_PATH) into
# .carry/lib/kprof.so, with the CUPTI library beside it (.carry/lib/libcupti.so.13), for the GPU
# machine. Needs gcc and pip access to PyPI here (the nvidia-cuda-cupti 13.0 wheel: headers + lib).
# Use on the GPU machine (see docs/gpu.md, "Kernel profile"):
#   CUDA_INJECTION64_PATH=$PWD/.carry/lib/kprof.so KPROF_OUT=$OUT/ours.tsv KPROF_LAST_S=5 gpu_bench ...
#   python3 tools/cuda/kprof/report.py $OUT/ours.tsv
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
PREFIX=${TAESD_CUDA_PREFIX:-$HOME/.cache/taesd-cuda}
CACHE=$PREFIX/cupti
TOOLKIT=$PREFIX/toolkit  # cuda.h (tools/cuda/setup-toolkit.sh)
[[ -e $TOOLKIT/include/cuda.h ]] || "$REPO/tools/cuda/setup-toolkit.sh" "$PREFIX" >&2
if [[ ! -e $CACHE/nvidia/cu13/include/cupti.h ]]; then
  mkdir -p "$CACHE/dl"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$CACHE/dl" "nvidia-cuda-cupti==13.0.*"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$CACHE"/dl/*.whl "$CACHE"
fi
mkdir -p "$REPO/.carry/lib"
cp "$CACHE/nvidia/cu13/lib/libcupti.so.13" "$REPO/.carry/lib/"
gcc -O2 -shared -fPIC -Wall -I"$CACHE/nvidia/cu13/include" -I"$TOOLKIT/include" "$REPO/tools/cuda/kprof/kprof.c" \
  -L"$REPO/.carry/lib" -l:libcupti.so.13 -Wl,-rpath,'$ORIGIN' -lpthread -o "$REPO/.carry/lib/kprof.so"
echo "built .carry/lib/kprof.so (+ libcupti.so.13)"
