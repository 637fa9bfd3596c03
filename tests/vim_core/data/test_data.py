import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vim_core.config import DataConfig
from vim_core.data.prepare import prepare, split_of
from vim_core.data.shards import iter_batches, load_split, read_manifest
from vim_core.errors import VimError


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig.model_validate({"out_dir": str(tmp_path / "out"), **kw})


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, mnist, per_class: int = 6, classes=(0, 1, 2)) -> Path:
    """Real MNIST digits as PNG/JPEG in one subfolder per class, in mixed modes and sizes."""
    images, labels = mnist
    for c in classes:
        d = root / f"digit{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(np.flatnonzero(labels == c)[:per_class]):
            img = images[idx]
            if i % 3 == 0:
                (d / f"{i}.png").write_bytes(_png(img))
            elif i % 3 == 1:
                rgba = np.stack([img, img, img, np.full_like(img, 255)], -1)
                (d / f"{i}.png").write_bytes(_png(rgba))
            else:
                big = Image.fromarray(img).resize((56, 40)).convert("RGB")
                big.save(d / f"{i}.jpg", quality=95)
    return root


def test_embedded_mnist_counts_split_and_determinism(tmp_path):
    report = prepare(_cfg(tmp_path))
    assert report.counts["train"] + report.counts["val"] + report.counts["test"] == 10_000
    assert 800 < report.counts["test"] < 1200 and 800 < report.counts["val"] < 1200
    manifest = read_manifest(tmp_path / "out")
    assert (manifest["test_fraction"], manifest["val_fraction"]) == (0.1, 0.1)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == report.counts
    assert manifest["num_classes"] == 10 and manifest["image_size"] == 32
    x, y = load_split(tmp_path / "out", "test")
    assert x.shape == (report.counts["test"], 1, 32, 32) and x.dtype == np.uint8
    assert x[:, :, :2].max() == 0  # MNIST's 28x28 is padded by 2 on each side
    assert set(np.unique(y)) == set(range(10))
    again = prepare(_cfg(tmp_path / "again"))
    assert again.manifest["version"] == report.manifest["version"]


def test_split_is_a_function_of_key_and_seed():
    keys = [f"k{i}" for i in range(2000)]
    test = [k for k in keys if split_of(k, 0, 0.2) == "test"]
    assert 300 < len(test) < 500
    assert test == [k for k in keys if split_of(k, 0, 0.2) == "test"]
    assert test != [k for k in keys if split_of(k, 1, 0.2) == "test"]


def test_val_is_carved_from_train_and_leaves_test_alone():
    keys = [f"k{i}" for i in range(4000)]
    without = {k: split_of(k, 0, 0.1) for k in keys}
    with_val = {k: split_of(k, 0, 0.1, 0.15) for k in keys}
    assert [k for k in keys if with_val[k] == "test"] == [k for k in keys if without[k] == "test"]
    val = [k for k in keys if with_val[k] == "val"]
    assert 450 < len(val) < 750 and all(without[k] == "train" for k in val)
    assert set(with_val.values()) == {"train", "val", "test"}


def test_val_split_on_disk_is_disjoint_and_empty_val_is_one_line(tmp_path, mnist):
    prepare(_cfg(tmp_path, max_images=600))
    root = tmp_path / "out"
    rows = {s: {x.tobytes() for x in load_split(root, s)[0]} for s in ("train", "val", "test")}
    assert all(rows.values()) and not (rows["val"] & rows["test"]) and not (rows["val"] & rows["train"])
    src = make_folder(tmp_path / "src", mnist)
    tiny = {"source": {"kind": "image_folder", "url": str(src)}, "test_fraction": 0.5, "val_fraction": 0.001}
    with pytest.raises(VimError, match=r"^source .*: the val split is empty \(18 usable images\)$"):
        prepare(_cfg(tmp_path / "tiny", **tiny))
    # val_fraction 0: no val split at all (evaluation then refuses to choose)
    report = prepare(_cfg(tmp_path / "noval", max_images=200, val_fraction=0.0))
    assert "val" not in report.counts


def test_iter_batches_shuffles_and_splits_ranks(tmp_path):
    prepare(_cfg(tmp_path, shard_size=1000, max_images=3000))
    root = tmp_path / "out"
    n = read_manifest(root)["splits"]["train"]["count"]
    seen = [y for _, y in iter_batches(root, "train", 64, seed=1)]
    assert sum(len(y) for y in seen) == n
    a = np.concatenate([y for _, y in iter_batches(root, "train", 64, seed=1)])
    b = np.concatenate([y for _, y in iter_batches(root, "train", 64, seed=2)])
    assert not np.array_equal(a, b)
    r0 = sum(len(y) for _, y in iter_batches(root, "train", 32, seed=1, rank=0, world_size=2))
    r1 = sum(len(y) for _, y in iter_batches(root, "train", 32, seed=1, rank=1, world_size=2))
    assert r0 + r1 == n


def test_image_folder_modes_sizes_and_labels(tmp_path, mnist):
    src = make_folder(tmp_path / "imgs", mnist)
    report = prepare(
        _cfg(tmp_path, source={"kind": "image_folder", "url": str(src)}, test_fraction=0.3, fit="center_crop")
    )
    assert sum(report.counts.values()) == 18
    manifest = report.manifest
    assert manifest["class_names"] == ["digit0", "digit1", "digit2"]
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape[1:] == (1, 32, 32) and set(y) <= {0, 1, 2}


def test_rgb_output_channels(tmp_path, mnist):
    src = make_folder(tmp_path / "imgs", mnist, per_class=3)
    prepare(
        _cfg(
            tmp_path,
            source={"kind": "image_folder", "url": str(src)},
            channels=3,
            test_fraction=0.5,
            image_size=16,
            fit="resize",
        )
    )
    x, _ = load_split(tmp_path / "out", "train")
    assert x.shape[1:] == (3, 16, 16)


def test_corrupt_images_are_skipped_and_counted(tmp_path, mnist):
    src = make_folder(tmp_path / "imgs", mnist, per_class=10)
    (src / "digit0" / "broken.png").write_bytes(_png(mnist[0][0])[:40])  # truncated
    (src / "digit1" / "garbage.jpg").write_bytes(b"not an image at all")
    report = prepare(_cfg(tmp_path, source={"kind": "image_folder", "url": str(src)}, max_bad_fraction=0.1))
    assert report.skipped == 2
    assert sum(report.counts.values()) == 30


def test_too_many_corrupt_images_fail_and_keep_old_output(tmp_path, mnist):
    src = make_folder(tmp_path / "imgs", mnist, per_class=4)
    cfg = _cfg(tmp_path, source={"kind": "image_folder", "url": str(src)}, test_fraction=0.4)
    prepare(cfg)
    before = (tmp_path / "out" / "manifest.json").read_text()
    for i in range(3):
        (src / "digit2" / f"bad{i}.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(VimError, match=r"3 of 15 images unreadable.*max_bad_fraction"):
        prepare(cfg)
    assert (tmp_path / "out" / "manifest.json").read_text() == before
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_class_folder_with_no_images(tmp_path, mnist):
    src = make_folder(tmp_path / "imgs", mnist, per_class=2)
    (src / "digit9").mkdir()
    (src / "digit9" / "notes.txt").write_text("no images here")
    with pytest.raises(VimError, match="class folder 'digit9' has no images"):
        prepare(_cfg(tmp_path, source={"kind": "image_folder", "url": str(src)}))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(VimError, match="not found"):
        prepare(_cfg(tmp_path, source={"kind": "image_folder", "url": str(tmp_path / "nope")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VimError, match="empty"):
        prepare(_cfg(tmp_path, source={"kind": "image_folder", "url": str(tmp_path / "empty")}))
    with pytest.raises(VimError, match="empty"):
        prepare(_cfg(tmp_path, source={"kind": "tar_shards", "url": str(tmp_path / "empty")}))
    assert not (tmp_path / "out").exists()


def make_tars(root: Path, mnist, layout: str, n: int = 40) -> Path:
    images, labels = mnist
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard}.tar", "w") as tar:
            for i in range(shard * n, (shard + 1) * n):
                members = {}
                if layout == "folders":
                    members[f"{labels[i]}/{i}.png"] = _png(images[i])
                else:
                    members[f"{i:06d}.png"] = _png(images[i])
                    members[f"{i:06d}.cls"] = str(int(labels[i])).encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


@pytest.mark.parametrize("layout", ["folders", "webdataset"])
def test_tar_shards(tmp_path, mnist, layout):
    src = make_tars(tmp_path / "tars", mnist, layout)
    report = prepare(_cfg(tmp_path, source={"kind": "tar_shards", "url": str(src)}, test_fraction=0.25))
    assert sum(report.counts.values()) == 80
    x, y = load_split(tmp_path / "out", "train")
    # labels survive the trip: the mean image of each class matches the source's
    images, labels = mnist
    names = report.manifest["class_names"]
    for cls in np.unique(y)[:3]:
        digit = int(names[cls])
        ours = x[y == cls][:, 0, 2:30, 2:30].mean()
        theirs = images[:80][labels[:80] == digit].mean()
        assert abs(ours - theirs) < 25
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["test"]["count"] > 0
