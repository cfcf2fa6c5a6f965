# Source this on the GPU machine, from the repository root, after shipping .carry/:
#
#   source tools/cuda/gpu-env.sh && cuda-smoke
#
# It
#   - unpacks .carry/bin/*.xz next to themselves (again only when an .xz is newer) and puts
#     .carry/bin on PATH;
#   - unpacks an ONNX Runtime CUDA bundle shipped as .carry/ort/ort-cuda-*.tar.xz into /opt/ort
#     (TAESD_ORT_DIR) once, and points ORT_DYLIB_PATH at its libonnxruntime.so.* (precompute only);
#   - makes every CUDA library our binaries need findable. libcuda.so.1 is the driver's. Each other
#     one (cudart 13, cublas/cublasLt 13, curand 10, cudnn 9, and whatever ONNX Runtime's CUDA
#     provider lacks) is taken from, in this order: the folders you list in TAESD_CUDA_LIBS
#     (colon-separated); the system library path, when ldconfig knows it; the PyTorch venv's
#     nvidia/*/lib folders (TORCH_VENV, default /opt/torch/.venv); .carry/lib (build.sh's copy of
#     libcudart.so.13). Folders used are prepended to LD_LIBRARY_PATH;
#   - raises the driver's PTX JIT cache limit so candle's kernels are JIT-compiled once per machine;
#   - runs ldd on each binary (and on ORT's CUDA provider) and reports any library not found.
# It sets no shell options and never exits your shell.

_taesd_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
_taesd_bin=$_taesd_repo/.carry/bin
_taesd_ort=${TAESD_ORT_DIR:-/opt/ort}

# 1. binaries
if [[ -d $_taesd_bin ]]; then
  for _xz in "$_taesd_bin"/*.xz; do
    [[ -e $_xz ]] || continue
    _exe=${_xz%.xz}
    if [[ ! -x $_exe || $_xz -nt $_exe ]]; then
      if command -v xz >/dev/null; then
        xz -dc "$_xz" > "$_exe.part"
      else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$_xz" "$_exe.part"
      fi && chmod 755 "$_exe.part" && mv "$_exe.part" "$_exe" && echo "gpu-env: unpacked ${_exe#"$_taesd_repo"/}"
    fi
  done
  case ":$PATH:" in *":$_taesd_bin:"*) ;; *) export PATH="$_taesd_bin:$PATH" ;; esac
else
  echo "gpu-env: no $_taesd_bin (ship .carry/ with the run)" >&2
fi

# 2. ONNX Runtime CUDA bundle (../shared/tools/ort-cuda-bundle.sh .carry/ort)
for _t in "$_taesd_repo"/.carry/ort/ort-cuda-*.tar.xz; do
  [[ -e $_t ]] || continue
  if [[ ! -e $_taesd_ort/.unpacked-${_t##*/} ]]; then
    mkdir -p "$_taesd_ort" && tar -C "$_taesd_ort" -xJf "$_t" && touch "$_taesd_ort/.unpacked-${_t##*/}" \
      && echo "gpu-env: unpacked ${_t##*/} into $_taesd_ort"
  fi
done
if [[ -z ${ORT_DYLIB_PATH:-} ]]; then
  for _f in "$_taesd_ort"/libonnxruntime.so.*; do [[ -e $_f ]] && export ORT_DYLIB_PATH=$_f; done
fi

# 3. CUDA libraries
_taesd_dirs=()
_taesd_add_dir() {
  local d
  for d in "${_taesd_dirs[@]}"; do [[ $d == "$1" ]] && return 0; done
  _taesd_dirs+=("$1")
}
_taesd_venv=${TORCH_VENV:-/opt/torch/.venv}
_taesd_own=() _taesd_later=()
if [[ -n ${TAESD_CUDA_LIBS:-} ]]; then IFS=: read -r -a _taesd_own <<< "$TAESD_CUDA_LIBS"; fi
for _d in "$_taesd_venv"/lib/python3*/site-packages/nvidia/*/lib; do
  [[ -d $_d ]] && _taesd_later+=("$_d")
done
_taesd_later+=("$_taesd_repo/.carry/lib")
_taesd_ldcache=$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null) )
# Sets _taesd_where to where SONAME comes from, and records its folder unless the loader finds it
# already. (No $(...) around it: the folder list must survive.)
_taesd_find() {
  local d
  _taesd_where="NOT FOUND"
  for d in "${_taesd_own[@]}"; do
    [[ -e $d/$1 ]] && { _taesd_add_dir "$d"; _taesd_where=$d/$1; return; }
  done
  if grep -q "^[[:space:]]*$1 " <<< "$_taesd_ldcache"; then
    _taesd_where="system: $(grep -m1 "^[[:space:]]*$1 " <<< "$_taesd_ldcache" | sed 's/.*=> //')"; return
  fi
  for d in "${_taesd_later[@]}"; do
    [[ -e $d/$1 ]] && { _taesd_add_dir "$d"; _taesd_where=$d/$1; return; }
  done
}
_taesd_export() {
  local i
  for (( i=${#_taesd_dirs[@]}-1; i>=0; i-- )); do
    case ":${LD_LIBRARY_PATH:-}:" in *":${_taesd_dirs[i]}:"*) ;; *) export LD_LIBRARY_PATH="${_taesd_dirs[i]}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
  done
}
for _so in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9; do
  _taesd_find "$_so"; printf 'gpu-env: %-18s %s\n' "$_so" "$_taesd_where"
done
_taesd_export
# ONNX Runtime's CUDA provider needs more of CUDA 13 (cuFFT, ...): resolve what ldd cannot find yet.
_taesd_ortcuda=$_taesd_ort/libonnxruntime_providers_cuda.so
if [[ -e $_taesd_ortcuda ]]; then
  _taesd_add_dir "$_taesd_ort"
  for _so in $(ldd "$_taesd_ortcuda" 2>/dev/null | awk '/not found/ {print $1}'); do
    _taesd_find "$_so"; printf 'gpu-env: %-18s %s (for ONNX Runtime CUDA)\n' "$_so" "$_taesd_where"
  done
  _taesd_export
fi
# (cuDNN 9 loads its engine libraries, libcudnn_*.so.9, by name: they sit beside libcudnn.so.9.)
echo "gpu-env: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
[[ -n ${ORT_DYLIB_PATH:-} ]] && echo "gpu-env: ORT_DYLIB_PATH=$ORT_DYLIB_PATH"

# 4. PTX JIT cache: candle ships PTX for compute_90, which the driver compiles on first use (~19 s)
# and caches in CUDA_CACHE_PATH (default ~/.nv/ComputeCache). 4 GiB is the driver's maximum.
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}

# 5. check
for _exe in "$_taesd_bin"/* "$_taesd_ortcuda"; do
  [[ -f $_exe ]] || continue
  [[ $_exe == "$_taesd_ortcuda" || ( -x $_exe && $_exe != *.xz ) ]] || continue
  _missing=$(ldd "$_exe" 2>&1 | grep -E 'not found|not a dynamic' || true)
  if [[ -n $_missing ]]; then
    echo "gpu-env: ${_exe##*/} is missing:" >&2; echo "$_missing" >&2
  else
    echo "gpu-env: ${_exe##*/}: all shared libraries found"
  fi
done
unset _taesd_repo _taesd_bin _taesd_ort _taesd_dirs _taesd_venv _taesd_own _taesd_later _taesd_ldcache \
  _taesd_ortcuda _taesd_where _so _d _f _t _xz _exe _missing
unset -f _taesd_add_dir _taesd_find _taesd_export
