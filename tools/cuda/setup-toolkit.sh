#!/usr/bin/env bash
# Assembles a CUDA 13.0 build toolkit from NVIDIA's PyPI wheels, enough for candle's `cuda`/`cudnn`
# features to compile and link here, on a machine with no GPU and no system CUDA.
#
#   usage: tools/cuda/setup-toolkit.sh [PREFIX]        (default PREFIX: $HOME/.cache/taesd-cuda)
#
# Produces
#   PREFIX/toolkit/bin        nvcc (a caching wrapper, see below; the compiler is nvcc.real), ptxas,
#                             fatbinary, nvlink, cudafe++ (+ nvcc.profile)
#   PREFIX/toolkit/nvvm       cicc, libdevice
#   PREFIX/toolkit/include    CUDA runtime/crt/cccl/cublas/curand/nvrtc/cudnn headers
#   PREFIX/toolkit/lib64      libcudart, libcublas(Lt), libcurand, libnvrtc, libcudnn (the 125 kB
#                             cuDNN front library only) with unversioned .so links for the linker
#   PREFIX/toolkit/lib64/stubs/libcuda.so{,.1}
#                             a link-only stub of the driver (SONAME libcuda.so.1): every cu* entry
#                             point returns CUDA_ERROR_UNKNOWN. The real driver is found at run time.
#   PREFIX/toolkit/targets/x86_64-linux/{include,lib,lib64} -> the above (nvcc.profile looks there)
#   PREFIX/env.sh             `source` it: CUDA_HOME/CUDA_PATH/CUDA_ROOT, NVCC, PATH
#   PREFIX/nvcc-cache/        filled by the nvcc wrapper as builds run
#
# Who looks where (candle 0.11.1):
#   candle-kernels' build script (cudaforge 0.1.6) runs $NVCC, else the first nvcc on PATH, and needs
#     nvcc's TOP/targets/x86_64-linux/include; it links `cudart` dynamically.
#   cudarc 0.19.10 (feature dynamic-linking, forced by candle) reads the CUDA version from
#     `nvcc --version` and adds -L $CUDA_HOME|$CUDA_PATH|$CUDA_ROOT/{lib64,lib64/stubs,...} to link
#     cuda, nvrtc, curand, cublas, cublasLt and (feature cudnn) cudnn.
#
# Idempotent: each wheel is fetched and unpacked once (stamp files under PREFIX/stamps); the stub
# and links are rebuilt only when missing. Needs: python3 with pip, gcc. Network: PyPI only.
set -euo pipefail

PREFIX=${1:-${TAESD_CUDA_PREFIX:-$HOME/.cache/taesd-cuda}}
TK=$PREFIX/toolkit
STAMPS=$PREFIX/stamps

# CUDA 13.0 Update 2 component versions. nvcc must stay at 13.0: PTX from a newer nvcc carries a
# newer PTX ISA that the GPU machine's driver (580, CUDA 13.0) refuses to JIT.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
  nvidia-cudnn-cu13==9.13.0.50
)

mkdir -p "$TK/bin" "$TK/include" "$TK/lib64/stubs" "$TK/nvvm" "$STAMPS"

# Unpack the parts of one wheel we need into the toolkit tree, keeping the executable bits that pip
# would keep (zip external attributes). Wheel paths: nvidia/cu13/{bin,include,lib,nvvm}/...,
# nvidia/cudnn/{include,lib}/...
unpack() {
  python3 - "$1" "$TK" <<'PY'
import os, shutil, sys, zipfile
whl, tk = sys.argv[1], sys.argv[2]
# files we never need for building: the 470 MB of cuDNN engine libraries, cuBLAS's BLAS shim,
# NVRTC's alternative build, static archives, CMake files, NVIDIA's scan metadata
skip = ("libcudnn_", "libnvblas", ".alt.so", "libcudart_static", "libcudadevrt")
n = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        parts = info.filename.split("/")
        if len(parts) < 4 or parts[0] != "nvidia" or info.is_dir():
            continue
        top, rest = parts[2], parts[3:]
        if top == "lib":
            if rest[0] == "cmake" or any(s in rest[-1] for s in skip):
                continue
            dest = os.path.join(tk, "lib64", *rest)
        elif top in ("bin", "include", "nvvm"):
            dest = os.path.join(tk, top, *rest)
        else:
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + ".part"
        with z.open(info) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        mode = (info.external_attr >> 16) & 0o777
        if mode & 0o111 or top == "bin" or rest[0] == "bin" or ".so" in rest[-1]:
            mode = 0o755
        os.chmod(tmp, mode or 0o644)
        os.replace(tmp, dest)
        n += 1
print(f"  unpacked {n} files from {os.path.basename(whl)}")
PY
}

for spec in "${WHEELS[@]}"; do
  stamp=$STAMPS/$spec
  [[ -e $stamp ]] && continue
  echo "fetching $spec"
  dl=$(mktemp -d "$PREFIX/dl.XXXXXX")
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$dl" "$spec"
  unpack "$dl"/*.whl
  rm -rf "$dl"
  touch "$stamp"
done
# a stamp from an older pin list is harmless; a pin we no longer list is simply left unused

# nvcc.profile reads headers and libraries under TOP/targets/x86_64-linux; a wheel install has them
# at TOP/include and TOP/lib.
mkdir -p "$TK/targets/x86_64-linux"
ln -sfn ../../include "$TK/targets/x86_64-linux/include"
ln -sfn ../../lib64 "$TK/targets/x86_64-linux/lib"
ln -sfn ../../lib64 "$TK/targets/x86_64-linux/lib64"
ln -sfn lib64 "$TK/lib"

# The linker resolves -lfoo through libfoo.so; wheels ship only the versioned SONAME file.
for so in libcudart.so.13 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9; do
  [[ -e $TK/lib64/$so ]] || { echo "missing $TK/lib64/$so (remove $STAMPS and rerun)" >&2; exit 1; }
  ln -sfn "$so" "$TK/lib64/${so%.so.*}.so"
done

# Link stub for the driver. Symbols: every cu* function declared by this toolkit's cuda.h (after the
# header's _v2/_v3 renames) plus every cu* function cudarc 0.19.10's driver bindings name (when its
# source is in the cargo registry), so any cudarc version cfg links.
stub=$TK/lib64/stubs/libcuda.so
if [[ ! -e $stub ]]; then
  echo "building the link stub $stub"
  tmp=$(mktemp -d)
  echo '#include <cuda.h>' | gcc -E -P -I "$TK/include" -x c - \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (\t' > "$tmp/names"
  for src in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs; do
    [[ -f $src ]] && grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src" | awk '{print $4}' >> "$tmp/names"
  done
  sort -u "$tmp/names" > "$tmp/names.u"
  {
    echo "/* generated by tools/cuda/setup-toolkit.sh: link-time stand-in for libcuda.so.1 */"
    while read -r f; do echo "int $f(void) { return 999; }"; done < "$tmp/names.u"
  } > "$tmp/libcuda_stub.c"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$tmp/libcuda.so" "$tmp/libcuda_stub.c"
  mv "$tmp/libcuda.so" "$stub"
  echo "  $(wc -l < "$tmp/names.u") entry points"
  rm -rf "$tmp"
fi
ln -sfn libcuda.so "$TK/lib64/stubs/libcuda.so.1"

# nvcc result cache. candle-kernels' build script compiles ~40 .cu files (the GGUF/MoE ones take
# ~20 min on 2 cores) into its OUT_DIR, and cargo gives it a fresh OUT_DIR whenever the features of
# its build dependencies (cudaforge -> serde, sha2, ...) differ between two builds, e.g. `-p taesd`
# vs `-p train`. So bin/nvcc is a wrapper that keeps each compile's output in PREFIX/nvcc-cache,
# keyed by the arguments (output path left out), the working directory, the host compiler, this
# toolkit's pins and the contents of every .cu/.cuh/.h/.hpp file of the crate being compiled. The
# compiler itself is bin/nvcc.real (nvcc reads nvcc.profile beside its own executable, so it stays
# in bin/). TAESD_NVCC_CACHE=0 turns the cache off.
if [[ ! -e $TK/bin/nvcc.real ]]; then
  mv "$TK/bin/nvcc" "$TK/bin/nvcc.real"
fi
{
  echo '#!/usr/bin/env bash'
  echo '# taesd nvcc cache: generated by tools/cuda/setup-toolkit.sh (see there)'
  echo "pins='${WHEELS[*]}'"
  echo "cache=\${TAESD_NVCC_CACHE_DIR:-$PREFIX/nvcc-cache}"
  cat <<'WRAPPER'
real="$(dirname "${BASH_SOURCE[0]}")/nvcc.real"
[[ ${TAESD_NVCC_CACHE:-1} == 0 ]] && exec "$real" "$@"
args=("$@") norm=() out= outdir= input=
for (( i=0; i<${#args[@]}; i++ )); do
  a=${args[i]}
  case $a in
    -o) out=${args[i+1]:-}; norm+=(-o @OUT); i=$((i+1)) ;;
    --output-directory) outdir=${args[i+1]:-}; norm+=(--output-directory @OUT); i=$((i+1)) ;;
    -o*|--output-file*|--output-directory=*|-M*|-E|--preprocess|-run|--run) exec "$real" "$@" ;;
    *.cu) [[ -n $input ]] && exec "$real" "$@"; input=$a; norm+=("$a") ;;
    *) norm+=("$a") ;;
  esac
done
[[ -n $input && -f $input && ( -n $out || -n $outdir ) ]] || exec "$real" "$@"
if [[ -z $out ]]; then
  ext=ptx
  for a in "${args[@]}"; do
    case $a in -c|--compile) ext=o ;; -cubin|--cubin) ext=cubin ;; -fatbin|--fatbin) ext=fatbin ;; esac
  done
  stem=${input##*/}
  out=$outdir/${stem%.cu}.$ext
fi
root=$(cd "$(dirname "$input")" && pwd)
while [[ $root != / && ! -e $root/Cargo.toml ]]; do root=$(dirname "$root"); done
[[ $root == / ]] && root=$(cd "$(dirname "$input")" && pwd)
key=$( {
  echo "$pins"; pwd; printf '%s\n' "${norm[@]}"; echo "${NVCC_PREPEND_FLAGS:-}|${NVCC_APPEND_FLAGS:-}"
  gcc --version 2>/dev/null | head -1
  sha256sum "$input"
  find "$root" -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.hpp' \) -print0 \
    | sort -z | xargs -0 -r sha256sum
} | sha256sum | cut -c1-40)
hit=$cache/${key:0:2}/$key
if [[ -f $hit ]]; then
  mkdir -p "$(dirname "$out")" && cp "$hit" "$out.cached.$$" && mv "$out.cached.$$" "$out" && exit 0
fi
"$real" "$@" || exit $?
[[ -f $out ]] || exit 0
mkdir -p "${hit%/*}" && cp "$out" "$hit.$$" && mv "$hit.$$" "$hit"
exit 0
WRAPPER
} > "$TK/bin/nvcc.part"
chmod 755 "$TK/bin/nvcc.part"
if cmp -s "$TK/bin/nvcc.part" "$TK/bin/nvcc"; then rm "$TK/bin/nvcc.part"; else mv "$TK/bin/nvcc.part" "$TK/bin/nvcc"; fi

cat > "$PREFIX/env.sh" <<EOF
# generated by tools/cuda/setup-toolkit.sh; source it before a candle CUDA build
export CUDA_HOME="$TK" CUDA_PATH="$TK" CUDA_ROOT="$TK" NVCC="$TK/bin/nvcc"
case ":\$PATH:" in *":$TK/bin:"*) ;; *) export PATH="$TK/bin:\$PATH" ;; esac
EOF

ver=$("$TK/bin/nvcc.real" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[[ $ver == 13.0 ]] || { echo "nvcc reports release '$ver', expected 13.0" >&2; exit 1; }
echo "toolkit ready: $TK (nvcc $ver); source $PREFIX/env.sh"
