#!/usr/bin/env bash
# Our exports in real torch on the GPU machine (issue 20): taesd.py's TAESD(encoder_path,
# decoder_path) on our .pth pairs (torch.load weights_only=True) for every variant, ComfyUI's
# vae_approx loading of them, and diffusers' AutoencoderTiny on our diffusers folders; outputs
# against candle's (bench/torch_consumers.py). Prepare here with bench/prepare_torch_consumers.sh.
#
#   source tools/cuda/gpu-env.sh; bash bench/gpu_torch_consumers.sh [TAESD_PY]
#
# Environment (defaults): FIX=.carry-consumers (fixtures; TAESD_PY defaults to $FIX/taesd.py),
# WHL=.whl (diffusers wheels, installed into /tmp/site when diffusers is missing), PY=python3 (the
# one with torch), OUT=${OUT:-bench/results/torch-consumers} (torch-consumers.{md,json}).
set -uo pipefail
cd "$(dirname "$0")/.."
FIX=${FIX:-.carry-consumers}
TAESD_PY=${1:-$FIX/taesd.py}
WHL=${WHL:-.whl}
PY=${PY:-python3}
OUT=${OUT:-bench/results/torch-consumers}
[[ -f $FIX/fixtures.json ]] || { echo "no $FIX/fixtures.json: run bench/prepare_torch_consumers.sh here first" >&2; exit 2; }
[[ -f $TAESD_PY ]] || { echo "no taesd.py at $TAESD_PY" >&2; exit 2; }
if ! "$PY" -c 'import diffusers' 2> /dev/null; then
  if ls "$WHL"/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "note: diffusers is missing and $WHL holds no wheels: the diffusers rows will say skipped" >&2
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
"$PY" bench/torch_consumers.py --taesd-py "$TAESD_PY" --fixtures "$FIX" --out "$OUT"
