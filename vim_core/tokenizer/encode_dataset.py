"""The tokenize_dataset step: encode a prepared dataset into uint16 token shards, one shard at a time.

It lives in the tokenizer package, above data: it reads and writes shards (vim_core.data) with any
tokenizer, so data never imports the tokenizer and the two packages do not import each other.
"""

from pathlib import Path

import numpy as np

from vim_core.data.shards import ShardWriter, iter_shards, read_manifest
from vim_core.errors import VimError
from vim_core.io import atomic_dir, sha256_file
from vim_core.progress import Progress
from vim_core.tokenizer.export import load_tokenizer


def tokenize_dataset(
    tokenizer_path: str,
    prepared_root: str | Path,
    out_dir: str | Path,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Write out_dir atomically (temp dir, then rename); returns the manifest. Any tokenizer arch works."""

    from tqdm import tqdm

    tokenizer = load_tokenizer(tokenizer_path, map_location=device).eval()
    if tokenizer.codebook_size > 65536:
        raise VimError(f"codebook of {tokenizer.codebook_size} codes does not fit uint16 token shards")
    source = read_manifest(prepared_root)
    if (source["image_size"], source["channels"]) != (tokenizer.image_size, tokenizer.channels):
        raise VimError(
            f"{prepared_root} holds {source['channels']}x{source['image_size']}px images but the tokenizer "
            f"expects {tokenizer.channels}x{tokenizer.image_size}px"
        )
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(
            tmp,
            shard_size=max(1, max(s["count"] for sp in source["splits"].values() for s in sp["shards"])),
            key="tokens",
        )
        total = sum(sp["count"] for sp in source["splits"].values())
        bar = tqdm(total=total, desc="tokenize_dataset", unit="img", disable=not progress)
        lines = Progress("tokenize_dataset", total, unit="img", per_second=True)
        for split in sorted(source["splits"]):
            for images, labels in iter_shards(prepared_root, split):
                tokens = tokenizer.encode_uint8(images, batch_size).numpy().astype(np.uint16)
                for t, y in zip(tokens, labels, strict=True):
                    writer.add(split, t, int(y))
                bar.update(len(images))
                lines.update(len(images))
        bar.close()
        manifest = writer.close(
            {
                "tokenizer_sha256": sha256_file(tokenizer_path) if Path(tokenizer_path).exists() else None,
                "tokenizer_path": str(tokenizer_path),
                "codebook_size": tokenizer.codebook_size,
                "grid": list(tokenizer.grid_size),
                "num_classes": source["num_classes"],
                "class_names": source["class_names"],
                "source_version": source.get("version"),
                "image_size": source["image_size"],
                "channels": source["channels"],
            }
        )
        return manifest
