"""The prepare_data step: stream a source into a sharded, split, checksummed dataset directory."""

import hashlib
import json
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from vim_core.config.data import DataConfig
from vim_core.data.decode_pool import decode_stream, resolve_workers
from vim_core.data.shards import ShardWriter
from vim_core.data.sources import open_source
from vim_core.data.storage import io_error
from vim_core.errors import VimError
from vim_core.io import atomic_dir
from vim_core.redact import redact

log = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    counts: dict[str, int]
    skipped: int
    manifest: dict


def split_of(key: str, seed: int, test_fraction: float, val_fraction: float = 0.0) -> str:
    """A sample's split depends only on its key and the seed, so it is stable as the dataset grows.

    One hash draw u in [0, 1) per key: test below test_fraction, val in the next val_fraction, train above.
    The test split is therefore the same whatever val_fraction is: adding val only carves it out of train.
    """
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def prepare(cfg: DataConfig, progress: bool = False) -> PrepareReport:
    """Write cfg.out_dir atomically: build in a temp dir, then swap it in; a failure leaves the old one."""
    with atomic_dir(cfg.out_dir) as tmp:
        return _write(cfg, tmp, progress)


def _guarded(samples, url: str):
    """Storage errors raised mid-stream become one-line VimErrors too."""
    try:
        yield from samples
    except VimError:
        raise
    except Exception as err:
        raise io_error(url, err) from None


def _write(cfg: DataConfig, tmp: Path, progress: bool) -> PrepareReport:
    from tqdm import tqdm

    source = open_source(cfg)
    writer = ShardWriter(tmp, cfg.shard_size)
    url = cfg.source.url or "embedded MNIST"
    seen = bad = 0
    samples = islice(_guarded(source.samples, url), cfg.max_images)
    workers = resolve_workers(cfg.workers)
    decoded = decode_stream(samples, cfg.channels, cfg.image_size, cfg.fit, workers)
    for sample, image, reason in tqdm(decoded, desc="prepare_data", unit="img", disable=not progress):
        seen += 1
        if sample.label >= len(source.class_names) or sample.label < 0:
            raise VimError(f"{sample.key}: label {sample.label} outside 0..{len(source.class_names) - 1}")
        if image is None:
            bad += 1
            log.warning("skipping unreadable image %s (%s)", sample.key, reason)
            continue
        writer.add(
            split_of(sample.key, cfg.split_seed, cfg.test_fraction, cfg.val_fraction), image, sample.label
        )
    if seen == 0:
        raise VimError(f"source {url}: empty (no images)")
    if bad:
        log.warning("skipped %d of %d images as unreadable", bad, seen)
    if bad / seen > cfg.max_bad_fraction:
        raise VimError(
            f"source {url}: {bad} of {seen} images unreadable ({bad / seen:.1%}), "
            f"above data.max_bad_fraction={cfg.max_bad_fraction}"
        )
    meta = {
        "source": redact(cfg.source.model_dump()),  # the manifest is shown and committed: no credentials
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "class_names": source.class_names,
        "num_classes": len(source.class_names),
        "test_fraction": cfg.test_fraction,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "seen": seen,
        "skipped": bad,
    }
    manifest = writer.close(meta)
    # val_fraction 0 means no val split (nothing then can be chosen on it); asked for, it must not be empty.
    for split in ("train", "test") + (("val",) if cfg.val_fraction > 0 else ()):
        if manifest["splits"].get(split, {}).get("count", 0) == 0:
            raise VimError(f"source {url}: the {split} split is empty ({seen - bad} usable images)")
    manifest["version"] = hashlib.sha256(
        json.dumps([s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]]).encode()
    ).hexdigest()[:16]
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    return PrepareReport(counts=counts, skipped=bad, manifest=manifest)
