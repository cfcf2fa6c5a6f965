#!/usr/bin/env bash
# Ship the GPU machine's inputs (the ORT bundle, the binaries, the image pool, the reference
# weights) in as few calls as the 64 MiB a call carries allows, the checkout itself included.
#
#   tools/cuda/carry_chunks.sh pack [PATH...]
#       here: one tar of PATHs (default: .carry/ort .carry/bin .carry/lib .carry-pool1 .carry-pool2),
#       split into .carry-chunk1/, .carry-chunk2/, ... each small enough to travel beside the
#       checkout (64 MiB minus what the checkout's tracked and untracked files weigh, minus 1 MiB);
#       prints the `carry` argument of each call.
#   tools/cuda/carry_chunks.sh receive [DEST=/data/chunks]
#       there, in each call: moves the chunk carried in this call to DEST; once every chunk is there
#       it unpacks them into the checkout (.carry/...) and the pool and weights tars into /data/pool
#       and /data/ref (DATA, default /data), then `source tools/cuda/gpu-env.sh` works as usual.
# The chunks are plain split bytes of one tar, so each call must follow the previous within the
# warm window (30 s): a machine given back loses the chunks received so far.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
LIMIT=$((64 * 1024 * 1024))

case ${1:-} in
  pack)
    shift
    paths=("$@")
    (( ${#paths[@]} )) || paths=(.carry/ort .carry/bin .carry/lib .carry-pool1 .carry-pool2)
    for p in "${paths[@]}"; do [[ -e $p ]] || { echo "carry_chunks: no $p here" >&2; exit 1; }; done
    # What travels anyway: tracked files and untracked files git does not ignore.
    tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    room=$((LIMIT - tree - 1024 * 1024 - 4096))
    (( room > 8 * 1024 * 1024 )) || { echo "carry_chunks: the checkout alone is $tree bytes: no room" >&2; exit 1; }
    rm -rf .carry-chunk[0-9]*
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tar -cf - "${paths[@]}" | split -b "$room" -d -a 2 - "$tmp/part"
    parts=("$tmp"/part*)
    n=${#parts[@]}
    i=0
    for f in "${parts[@]}"; do
      i=$((i + 1))
      mkdir -p ".carry-chunk$i"
      mv "$f" ".carry-chunk$i/part$(printf %02d $((i - 1)))"
      echo "$n" > ".carry-chunk$i/of"
    done
    echo "checkout $tree bytes; $n chunks of at most $room bytes (${paths[*]}):"
    for i in $(seq 1 "$n"); do echo "  call $i: carry [\".carry-chunk$i\"]  then  tools/cuda/carry_chunks.sh receive"; done
    ;;
  receive)
    dest=${2:-/data/chunks}; data=${DATA:-/data}
    mkdir -p "$dest"
    found=0
    for d in .carry-chunk[0-9]*; do
      [[ -d $d ]] || continue
      cp "$d"/part* "$dest"/ && cp "$d/of" "$dest/of" && found=1
    done
    (( found )) || { echo "carry_chunks: no .carry-chunkN folder came with this call" >&2; exit 1; }
    n=$(cat "$dest/of"); have=$(ls "$dest"/part* | wc -l)
    echo "carry_chunks: $have of $n chunks in $dest"
    (( have == n )) || exit 0
    cat "$dest"/part* | tar -xf - -C "$REPO"
    mkdir -p "$data/ref"
    for t in .carry-pool1/pool1.tar .carry-pool2/pool2.tar; do [[ -e $t ]] && tar -C "$data" -xf "$t"; done
    [[ -e .carry-pool2/ref.tar ]] && tar -C "$data/ref" --strip-components=1 -xf .carry-pool2/ref.tar
    rm -f .carry-pool1/pool1.tar .carry-pool2/pool2.tar
    echo "carry_chunks: unpacked: $(ls -d .carry/* | tr '\n' ' ')$(ls "$data/pool" 2>/dev/null | wc -l) files in $data/pool, $(ls "$data/ref" 2>/dev/null | tr '\n' ' ')"
    ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
