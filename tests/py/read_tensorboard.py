"""Read a run folder's TensorBoard event files with the tensorboard package's own reader.

    python3 tests/py/read_tensorboard.py RUN_DIR

Prints one JSON line: {"scalars": {tag: [[step, value], ...]}, "images": {tag: [[step, width,
height, png_bytes], ...]}, "files": n}. The reader checks both CRCs of every record and drops
the steps a SessionLog START (a resumed session) says were redone, as TensorBoard does.
"""
import glob
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator


def main():
    run = sys.argv[1]
    files = glob.glob(os.path.join(run, "*tfevents*"))
    acc = event_accumulator.EventAccumulator(run, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]}
    images = {t: [[e.step, e.width, e.height, len(e.encoded_image_string)] for e in acc.Images(t)] for t in tags["images"]}
    print(json.dumps({"scalars": scalars, "images": images, "files": len(files)}))


if __name__ == "__main__":
    main()
