"""prepare_data with several decoding processes writes byte-for-byte what one process writes."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vim_core.config.data import DataConfig
from vim_core.data import decode_pool
from vim_core.data.prepare import prepare


def _folder(root: Path, per_class: int = 150) -> Path:
    """Three classes of noisy JPEGs and PNGs of varied sizes, and two files that do not decode."""
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(20, 90, size=2)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG" if i % 2 else "PNG")
            (d / f"{i:04d}.{'jpg' if i % 2 else 'png'}").write_bytes(buf.getvalue())
    (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "class2" / "empty.png").write_bytes(b"")
    return root


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_two_workers_write_the_same_bytes(tmp_path, fit):
    src = _folder(tmp_path / "images")
    reports = {}
    for workers in (1, 2):
        cfg = DataConfig(
            source={"kind": "image_folder", "url": str(src)},
            out_dir=str(tmp_path / f"out{workers}"),
            channels=3,
            fit=fit,
            shard_size=100,
            workers=workers,
        )
        reports[workers] = prepare(cfg)
    assert reports[1].skipped == reports[2].skipped == 2
    assert reports[1].counts == reports[2].counts and sum(reports[1].counts.values()) == 450
    one, two = _files(tmp_path / "out1"), _files(tmp_path / "out2")
    assert len(one) > 4 and one.keys() == two.keys()
    assert all(one[k] == two[k] for k in one)


def test_embedded_source_with_workers_and_a_cap(tmp_path):
    outs = {}
    for workers in (1, 3):
        cfg = DataConfig(out_dir=str(tmp_path / f"out{workers}"), max_images=500, workers=workers)
        assert sum(prepare(cfg).counts.values()) == 500
        outs[workers] = _files(tmp_path / f"out{workers}")
    assert outs[1] == outs[3]


def test_stream_order_and_bounded_in_flight(monkeypatch):
    """Results come back in input order, with at most IN_FLIGHT_PER_WORKER chunks per worker queued."""
    from vim_core.data.sources import Sample

    monkeypatch.setattr(decode_pool, "CHUNK", 4)
    consumed = []

    def samples():
        for i in range(50):
            consumed.append(i)
            img = Image.fromarray(np.full((8, 8), i, dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            yield Sample(key=str(i), label=0, raw=buf.getvalue())

    out = decode_pool.decode_stream(samples(), 1, 8, "resize", workers=2)
    first = next(out)
    # One result taken: the reader is at most 2 workers x 2 chunks x 4 images ahead.
    assert first[0].key == "0" and len(consumed) <= 16
    rest = list(out)
    assert [s.key for s, _, _ in [first, *rest]] == [str(i) for i in range(50)]
    assert all(int(img[0, 0, 0]) == int(s.key) for s, img, _ in [first, *rest])


def test_workers_setting():
    assert decode_pool.resolve_workers(3) == 3
    assert decode_pool.resolve_workers("auto") >= 1
    with pytest.raises(ValueError):
        DataConfig(workers=0)
