"""Sharded uint8 datasets on disk: written one shard at a time, read back as a stream.

Layout of a dataset directory:
    manifest.json                 counts, shapes, class names, and sha256 of every shard
    {split}-{index:05d}.npz       arrays: `images` uint8 (N, C, H, W) and `labels` int64 (N,)
Token datasets use the same layout with `tokens` uint16 (N, L) in place of `images`.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vim_core.errors import VimError
from vim_core.io import atomic_path, sha256_file

MANIFEST = "manifest.json"


class ShardWriter:
    """Buffers at most `shard_size` samples per split, so memory stays flat as data grows."""

    def __init__(self, out_dir: str | Path, shard_size: int, key: str = "images"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.key = key
        self._buffers: dict[str, tuple[list[np.ndarray], list[int]]] = {}
        self.shards: dict[str, list[dict]] = {}
        self.counts: dict[str, int] = {}

    def add(self, split: str, array: np.ndarray, label: int) -> None:
        arrays, labels = self._buffers.setdefault(split, ([], []))
        arrays.append(array)
        labels.append(int(label))
        if len(arrays) >= self.shard_size:
            self._flush(split)

    def _flush(self, split: str) -> None:
        arrays, labels = self._buffers.get(split, ([], []))
        if not arrays:
            return
        index = len(self.shards.setdefault(split, []))
        name = f"{split}-{index:05d}.npz"
        path = self.out_dir / name
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **{self.key: np.stack(arrays), "labels": np.asarray(labels, dtype=np.int64)})
        self.shards[split].append({"file": name, "count": len(arrays), "sha256": sha256_file(path)})
        self.counts[split] = self.counts.get(split, 0) + len(arrays)
        self._buffers[split] = ([], [])

    def close(self, meta: dict) -> dict:
        """Flush what is left and write the manifest; returns it."""
        for split in list(self._buffers):
            self._flush(split)
        manifest = {
            **meta,
            "key": self.key,
            "splits": {
                s: {"count": self.counts.get(s, 0), "shards": self.shards.get(s, [])}
                for s in sorted(self.shards)
            },
        }
        with atomic_path(self.out_dir / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise VimError(f"{path}: no dataset manifest; run the stage that writes {root} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VimError(f"{path}: corrupt manifest ({err.msg} at line {err.lineno})") from None


def iter_shards(
    root: str | Path, split: str, order: list[int] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (array, labels) one shard at a time, in manifest order or in `order`."""
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise VimError(f"{root}: no split named {split!r} (have {sorted(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    key = manifest.get("key", "images")
    for i in order if order is not None else range(len(shards)):
        path = Path(root) / shards[i]["file"]
        try:
            with np.load(path) as npz:
                yield npz[key], npz["labels"]
        except (OSError, ValueError, KeyError) as err:
            raise VimError(f"{path}: unreadable shard ({err})") from None


def load_split(root: str | Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole split in memory; for small evaluation sets, not for training streams."""
    arrays, labels, n = [], [], 0
    for a, y in iter_shards(root, split):
        arrays.append(a)
        labels.append(y)
        n += len(a)
        if limit is not None and n >= limit:
            break
    if not arrays:
        raise VimError(f"{root}: split {split!r} is empty")
    a, y = np.concatenate(arrays), np.concatenate(labels)
    return (a[:limit], y[:limit]) if limit is not None else (a, y)


def iter_batches(
    root: str | Path,
    split: str,
    batch_size: int,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over a split in batches of `batch_size` per rank. With a seed, shard order and samples
    inside a shard are shuffled.

    Under DDP (world_size > 1) this is a distributed sampler over one global stream: consecutive global
    batches of batch_size * world_size samples, of which rank r takes the r-th contiguous slice. So the
    ranks' slices are disjoint, every rank yields the same number of batches, and together they are
    exactly the batches a single process with batch_size * world_size would see. A last partial global
    batch (drop_last=False) is split as evenly as np.array_split does; a rank whose share is empty skips it.
    """
    manifest = read_manifest(root)
    n_shards = len(manifest["splits"].get(split, {}).get("shards", []))
    rng = np.random.default_rng(seed) if seed is not None else None
    order = list(rng.permutation(n_shards)) if rng is not None else None
    global_batch = batch_size * world_size
    lo, hi = rank * batch_size, (rank + 1) * batch_size
    carry_a: list[np.ndarray] = []
    carry_y: list[np.ndarray] = []
    pending = 0
    for a, y in iter_shards(root, split, order):
        idx = rng.permutation(len(a)) if rng is not None else np.arange(len(a))
        carry_a.append(a[idx])
        carry_y.append(y[idx])
        pending += len(idx)
        if pending < global_batch:
            continue
        a_all, y_all = np.concatenate(carry_a), np.concatenate(carry_y)
        full = pending - pending % global_batch
        for start in range(0, full, global_batch):
            # Copies, so a yielded batch does not pin the whole shard in memory.
            yield a_all[start + lo : start + hi].copy(), y_all[start + lo : start + hi].copy()
        carry_a, carry_y = [a_all[full:]], [y_all[full:]]
        pending -= full
    if pending and not drop_last:
        a_all, y_all = np.concatenate(carry_a), np.concatenate(carry_y)
        share = np.array_split(np.arange(pending), world_size)[rank]
        if len(share):
            yield a_all[share], y_all[share]
