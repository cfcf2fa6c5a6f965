#!/usr/bin/env bash
# Carry a run's latest checkpoint off a machine in parts small enough for a transfer limit, and
# put it back: a run longer than one stint on a lent GPU machine continues on the next one.
#   tools/checkpoint_parts.sh pack RUN_DIR OUT_DIR [PART_BYTES=16000000]
#       -> OUT_DIR/ckpt-STEP.tar.part00, part01, ...: the newest checkpoint folder, config.toml,
#          metrics.jsonl (and eval.json, loss.png when there); sha256 in OUT_DIR/ckpt-STEP.sha256
#   tools/checkpoint_parts.sh unpack RUN_DIR PART...   (all parts of one checkpoint, in order)
# A checkpoint without the replay buffer (run.checkpoint_replay = false) is ~143 MB for taef2
# (encoder and decoder with their EMA and AMSGrad moments 2 x 37 MB, discriminator and its AdamW
# moments 90 MB): 9 parts of 16 MB; each EMA probe (recipe.ema_probe_decays) adds ~15 MB, so the
# scratch config's two make ~173 MB, 11 parts. `train --run-dir RUN_DIR --resume` then continues from it.
set -euo pipefail
cmd=${1:?pack or unpack}; run=${2:?RUN_DIR}
case $cmd in
  pack)
    out=${3:?OUT_DIR}; part=${4:-16000000}
    ck=$(ls -d "$run"/checkpoints/step-* | sort | tail -1)
    step=$(basename "$ck" | sed 's/^step-0*//')
    mkdir -p "$out"
    files=("checkpoints/$(basename "$ck")" config.toml metrics.jsonl)
    for f in eval.json loss.png export/export.json; do [[ -e $run/$f ]] && files+=("$f"); done
    tar -C "$run" -cf - "${files[@]}" | split -b "$part" -d -a 2 - "$out/ckpt-$step.tar.part"
    (cd "$out" && sha256sum ckpt-"$step".tar.part* > "ckpt-$step.sha256")
    ls -l "$out"/ckpt-"$step".*
    ;;
  unpack)
    shift 2
    (( $# )) || { echo "unpack: give the parts" >&2; exit 2; }
    d=$(dirname "$1"); b=$(basename "$1" | sed 's/\.tar\.part[0-9]*$//')
    [[ -e $d/$b.sha256 ]] && (cd "$d" && sha256sum -c --quiet "$b.sha256")
    mkdir -p "$run"
    cat "$@" | tar -C "$run" -xf -
    ls -d "$run"/checkpoints/step-*
    ;;
  *) echo "usage: $0 pack RUN_DIR OUT_DIR [PART_BYTES] | unpack RUN_DIR PART..." >&2; exit 2 ;;
esac
