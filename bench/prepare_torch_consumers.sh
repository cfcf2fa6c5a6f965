#!/usr/bin/env bash
# Here (no GPU needed), before bench/gpu_torch_consumers.sh: what the GPU machine's check of our
# exports with real torch needs, in git-ignored folders that the device tool carries.
#
#   bench/prepare_torch_consumers.sh PATH/TO/taesd.py
#
#   .carry-consumers/           fixtures from `cargo run -p taesd-e2e --example consumer_fixtures`:
#                               per variant our .pth pair, the diffusers folder (taesd, taesdxl,
#                               taesd3, taef1), a real image and candle's latent and decoded image
#                               (.npy); taesd.py copied in (madebyollin/taesd; not in this repo)
#   .whl/                       diffusers and importlib_metadata wheels (the rest of diffusers'
#                               needs are in the GPU machine's python3)
# taesd.py: e.g. `git -C <mirror of madebyollin/taesd> show HEAD:taesd.py > /tmp/taesd.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 1 && -f $1 ]] || { echo "usage: $0 PATH/TO/taesd.py" >&2; exit 2; }
FIX=${FIX:-.carry-consumers}
DIFFUSERS=${DIFFUSERS:-diffusers==0.42.1}
IMPORTLIB_METADATA=${IMPORTLIB_METADATA:-importlib_metadata==10.2.0}
rm -rf "$FIX"
nice -n 10 cargo run -q -p taesd-e2e --example consumer_fixtures -- "$FIX"
cp "$1" "$FIX/taesd.py"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$DIFFUSERS" "$IMPORTLIB_METADATA"
du -sh "$FIX" .whl
echo "next, on the GPU machine (device run with carry [\"$FIX\", \".whl\"]):"
echo "  source tools/cuda/gpu-env.sh; bash bench/gpu_torch_consumers.sh"
