"""prepare_data throughput at 1 and N decoding processes, on a folder of natural-size JPEGs. Prints JSON.

python -m benchmarks.prepare_throughput [--images 20000] [--workers 1,2] [--out FILE]

The folder holds MNIST digits upscaled to 256x256 RGB with noise and a tint, saved as JPEG (quality 90):
about ImageNet's decode work per image, on data that ships here. Each setting runs `prepare` in a child
process; the peak RSS is the sum over that process and its decoders, sampled every 50 ms. The shards and
manifests of all settings are compared byte for byte.
"""

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from benchmarks import host
from vim_core.data.sources import embedded_mnist_path
from vim_core.io import atomic_write_text

SIZE = 256
CHILD = """
import json, sys, time
from vim_core.config.data import DataConfig
from vim_core.data.prepare import prepare
cfg = DataConfig.model_validate({"source": {"kind": "image_folder", "url": sys.argv[1]}, "out_dir": sys.argv[2],
    "image_size": 64, "channels": 3, "fit": "center_crop", "shard_size": 4096, "workers": int(sys.argv[3])})
t = time.perf_counter()
report = prepare(cfg)
print(json.dumps({"images": sum(report.counts.values()), "seconds": time.perf_counter() - t}))
"""


def _write_chunk(args: tuple) -> None:
    root, start, stop = args
    with np.load(embedded_mnist_path()) as npz:
        images, labels = npz["images"], npz["labels"]
    order = np.random.default_rng(0).permutation(len(images))  # the package groups digits by class
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        j = order[i % len(images)]
        digit = Image.fromarray(images[j]).resize((SIZE, SIZE), Image.BICUBIC)
        tint = rng.uniform(0.4, 1.0, size=3)
        rgb = np.asarray(digit, dtype=np.float32)[..., None] * tint + rng.normal(0, 12, (SIZE, SIZE, 3))
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        img.save(Path(root) / str(labels[j]) / f"{i:07d}.jpg", quality=90)


def make_folder(root: Path, n: int) -> None:
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    step = 1000
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_chunk, [(str(root), s, min(s + step, n)) for s in range(0, n, step)]))


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a decoder that just ended
            total += p.memory_info().rss
    return total


def measure(src: Path, out: Path, workers: int) -> dict:
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), str(out), str(workers)], stdout=subprocess.PIPE, text=True
    )
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, _tree_rss(proc))
        time.sleep(0.05)
    stdout = child.stdout.read()
    if child.returncode != 0:
        raise SystemExit(f"prepare with {workers} workers failed (exit {child.returncode})")
    row = json.loads(stdout.strip().splitlines()[-1])
    return {
        "workers": workers,
        "images": row["images"],
        "seconds": round(row["seconds"], 2),
        "images_per_s": round(row["images"] / row["seconds"], 1),
        "process_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": round(peak / 2**20, 1),
    }


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(out).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", default="1,2", help="comma-separated settings of data.workers")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    settings = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        src = Path(tmp) / "images"
        t = time.perf_counter()
        make_folder(src, args.images)
        made = time.perf_counter() - t
        folder_mib = sum(p.stat().st_size for p in src.rglob("*.jpg")) / 2**20
        rows = [measure(src, Path(tmp) / f"out{w}", w) for w in settings]
        digests = {w: digest(Path(tmp) / f"out{w}") for w in settings}
    base = rows[0]["images_per_s"]
    result = {
        "benchmark": "prepare_throughput",
        "machine": host.machine(),
        "folder": {
            "images": args.images,
            "jpeg": f"{SIZE}x{SIZE} RGB, quality 90",
            "mib": round(folder_mib, 1),
            "seconds_to_make": round(made, 1),
        },
        "prepare": "image_size 64, channels 3, fit center_crop",
        "runs": rows,
        "speedup": {str(r["workers"]): round(r["images_per_s"] / base, 2) for r in rows},
        "images_per_s_per_core": round(base, 1),
        "byte_identical": len(set(digests.values())) == 1,
        "outputs_sha256": digests[settings[0]],
    }
    text = json.dumps(result, indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0 if result["byte_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
