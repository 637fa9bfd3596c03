"""vim_core.io.atomic_dir, the one atomic-directory writer (datasets, token shards, outbox, checkpoints).

A writer killed at any instant leaves a whole directory under the final name (the old or the new one),
never a half-deleted one; with durable=True every byte is on disk before the name appears.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from vim_core.io import atomic_dir
from vim_core.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
FILES = 400  # enough that deleting an old version takes long enough to be hit by a kill
WRITER = f"""
import sys
from pathlib import Path
from vim_core.io import atomic_dir

final = Path(sys.argv[1])
for version in range(int(sys.argv[2]), 10**9):
    with atomic_dir(final) as tmp:
        for i in range({FILES}):
            (tmp / f"{{i}}.txt").write_text(str(version))
"""


def _version(folder: Path) -> int:
    try:
        return int((folder / "0.txt").read_text())
    except (OSError, ValueError):
        return -1


def _whole(folder: Path) -> bool:
    """All FILES files present and of one version."""
    texts = {p.read_text() for p in folder.iterdir()}
    return len(list(folder.iterdir())) == FILES and len(texts) == 1


def _count(folder: Path) -> int | None:
    try:
        return len(os.listdir(folder))
    except FileNotFoundError:
        return None


def test_readers_and_kills_never_meet_a_half_deleted_directory(tmp_path):
    final, rng = tmp_path / "out" / "prepared", random.Random(0)
    seen: set[int | None] = set()
    for kill in range(1, 7):
        base = kill * 10**6  # this writer's versions, told apart from the last one's
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(final), str(base)], env={**os.environ, "PYTHONPATH": str(REPO)}
        )
        deadline = time.monotonic() + 60
        while _version(final) < base and time.monotonic() < deadline:
            time.sleep(0.002)
        until = time.monotonic() + rng.uniform(0.1, 0.4)
        while time.monotonic() < until:  # a reader beside the writer: the old or the new, whole
            seen.add(_count(final))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        left = sorted(p.name for p in final.parent.iterdir() if p != final)
        # The old version is moved aside, then the new one renamed in: between the two renames (a few
        # microseconds) the whole old one waits under .old-prepared-*.
        aside = [final.parent / n / "prepared" for n in left if n.startswith(".old-prepared-")]
        assert _whole(final) if final.exists() else [_whole(p) for p in aside if p.exists()] == [True], left
        assert all(n == ".prepared.tmp" or n.startswith(".old-prepared-") for n in left), left
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in final.parent.iterdir()) == ["prepared"]
    # Absent only between the two renames (microseconds), never seen part-deleted.
    assert seen <= {FILES, None} and FILES in seen, seen


def test_a_failed_block_keeps_the_old_directory_and_a_crashed_swap_is_swept(tmp_path):
    final = tmp_path / "tokens"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("old")
    (
        tmp_path / ".old-tokens-x1y2"
    ).mkdir()  # what a crash between moving the old dir aside and the rename left
    try:
        with atomic_dir(final, tmp_name=".tmp-tokens-mine") as tmp:
            assert tmp == tmp_path / ".tmp-tokens-mine"
            (tmp / "a").write_text("half")
            raise RuntimeError("disk full")
    except RuntimeError:
        pass
    assert (final / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-tokens-x1y2", "tokens"]
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]
    assert [p.name for p in final.iterdir()] == ["b"]


def _record_syncs(monkeypatch) -> list[tuple]:
    """The real os.fsync and os.replace, each call noted with the paths it touched, in order."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_durable_syncs_every_file_and_the_dir_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()  # as /proc/self/fd names it
    final = tmp_path / "classifier"
    with atomic_dir(final) as tmp:
        (tmp / "old").write_text("old")
    events = _record_syncs(monkeypatch)
    with atomic_dir(final, durable=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
        (tmp / "meta.json").write_text("{}")
    tmp = str(tmp_path / ".classifier.tmp")
    swap = events.index(("replace", tmp, str(final)))
    synced_before = {e[1] for e in events[:swap] if e[0] == "fsync"}
    assert synced_before == {f"{tmp}/sub/w.bin", f"{tmp}/meta.json", f"{tmp}/sub", tmp}
    assert events[swap + 1 :] == [("fsync", str(tmp_path))]  # the old dir, moved aside, just goes
    assert events[swap - 1][0] == "replace" and events[swap - 1][1] == str(final)  # old moved aside first
    assert sorted(p.name for p in final.rglob("*")) == ["meta.json", "sub", "w.bin"]


def test_a_checkpoint_is_on_disk_before_its_step_name_appears(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    model = torch.nn.Linear(3, 2)
    ckpt.save_checkpoint(tmp_path, 1, {"model": model})
    events = _record_syncs(monkeypatch)
    final = ckpt.save_checkpoint(tmp_path, 1, {"model": model})  # over an existing step: the swap path
    (swap,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final)]
    tmp = events[swap][1]
    assert Path(tmp).name.startswith(".tmp-step-00000001-")
    synced_before = {e[1] for e in events[:swap] if e[0] == "fsync"}
    assert synced_before == {tmp} | {f"{tmp}/{f}" for f in ("model.safetensors", "state.pt", "meta.json")}
    assert ("fsync", str(tmp_path)) in events[swap + 1 :]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
