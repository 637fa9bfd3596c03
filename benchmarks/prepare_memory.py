"""Streaming check for prepare_data: peak RSS on an image folder at 1x and 10x size. Prints JSON.

python -m benchmarks.prepare_memory [--base 2000]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vim_core.data.sources import embedded_mnist_path

CHILD = """
import resource, sys, time
from vim_core.config import DataConfig
from vim_core.data.prepare import prepare
cfg = DataConfig.model_validate({"source": {"kind": "image_folder", "url": sys.argv[1]},
                                 "out_dir": sys.argv[2], "channels": 3, "fit": "resize", "shard_size": 1024})
t = time.perf_counter()
report = prepare(cfg)
print(sum(report.counts.values()), time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_folder(root: Path, n: int) -> None:
    """n real MNIST digits, tinted and upscaled to 64x64 RGB PNGs, in 10 class folders."""
    with np.load(embedded_mnist_path()) as npz:
        images, labels = npz["images"], npz["labels"]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))  # the package groups digits by class
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        j = order[i % len(images)]
        tint = rng.uniform(0.5, 1.0, size=3)
        rgb = (images[j][..., None] * tint).astype(np.uint8)
        Image.fromarray(rgb).resize((64, 64)).save(root / str(labels[j]) / f"{i:07d}.png")


def measure(n: int, work: Path) -> dict:
    src = work / f"src-{n}"
    make_folder(src, n)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(work / f"out-{n}")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    count, seconds, rss_kb = int(out[0]), float(out[1]), int(out[2])
    return {
        "images": count,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds),
        "peak_rss_mb": round(rss_kb / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        one = measure(args.base, Path(tmp))
        ten = measure(10 * args.base, Path(tmp))
    result = {
        "benchmark": "prepare_memory",
        "x1": one,
        "x10": ten,
        "rss_ratio": round(ten["peak_rss_mb"] / one["peak_rss_mb"], 3),
        "wall_s": round(time.perf_counter() - t, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
