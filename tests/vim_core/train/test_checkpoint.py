"""Checkpoints: exact round-trip, damage detection, pruning, resume semantics, a real SIGKILL mid-run,
and the file tracker's resume behaviour (it must agree with the checkpoint's step)."""

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vim_core.config.schedule import CosineSchedule
from vim_core.errors import VimError
from vim_core.train import checkpoint as ckpt
from vim_core.train.loop import EMA
from vim_core.train.schedule import make_scheduler
from vim_core.train.tracking import JsonlTracker, MultiTracker, NullTracker, Tracker

REPO = Path(__file__).resolve().parents[3]
TOY = REPO / "tests" / "scripts" / "train_toy.py"


class Tied(nn.Module):
    """Embedding tied to the output head, like a GPT: safetensors refuses shared storage unless handled."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))

    def forward(self, idx):
        return self.head(torch.relu(self.body(self.emb(idx)))) * self.scale[0]


def _train(model, opt, sched, ema, steps=3):
    for _ in range(steps):
        loss = model(torch.randint(0, 11, (4,))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-4)
    sched = make_scheduler(opt, CosineSchedule(peak_lr=1e-2, final_lr=1e-3, warmup_steps=2), total_steps=20)
    return model, opt, sched, EMA(model, decay=0.9)


def _save(tmp_path, step, model, opt, sched, ema, **kw):
    return ckpt.save_checkpoint(
        tmp_path,
        step,
        {"model": model, "ema": ema},
        {"opt": opt},
        {"sched": sched},
        extra={"epoch": 1, "position": [3, 4]},
        **kw,
    )


def test_round_trip_restores_everything_exactly(tmp_path):
    model, opt, sched, ema = _setup()
    _train(model, opt, sched, ema)
    path = _save(tmp_path, 3, model, opt, sched, ema)
    assert path == tmp_path / "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors",
        "meta.json",
        "model.safetensors",
        "state.pt",
    ]
    assert json.loads((path / "meta.json").read_text())["step"] == 3
    # state.pt holds plain types only
    assert torch.load(path / "state.pt", weights_only=True)["step"] == 3
    expected_next = (torch.rand(3), np.random.rand(3), random.random())
    ref_model, ref_opt, ref_ema = (
        {k: v.clone() for k, v in model.state_dict().items()},
        opt.state_dict(),
        {k: v.clone() for k, v in ema.state_dict().items()},
    )
    ref_lr, ref_epoch = sched.get_last_lr(), sched.last_epoch

    model2, opt2, sched2, ema2 = _setup(seed=99)  # different weights, fresh optimizer and schedule
    torch.rand(5), np.random.rand(7), random.random()  # move every RNG on
    extra = ckpt.load_checkpoint(path, {"model": model2, "ema": ema2}, {"opt": opt2}, {"sched": sched2})

    assert extra == {"epoch": 1, "position": [3, 4]}
    for k, v in ref_model.items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert model2.head.weight is model2.emb.weight  # still tied
    for k, v in ref_ema.items():
        assert torch.equal(ema2.state_dict()[k], v), k
    st2 = opt2.state_dict()
    assert st2["param_groups"] == ref_opt["param_groups"]
    for pid, pstate in ref_opt["state"].items():
        for name, t in pstate.items():
            assert torch.equal(st2["state"][pid][name], t), (pid, name)
    assert sched2.last_epoch == ref_epoch and sched2.get_last_lr() == ref_lr
    got_next = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got_next[0], expected_next[0])
    assert np.array_equal(got_next[1], expected_next[1])
    assert got_next[2] == expected_next[2]


def test_compiled_wrapper_saves_plain_keys(tmp_path):
    model, opt, sched, ema = _setup()
    compiled = torch.compile(model)  # lazy: nothing compiles until a forward, but keys gain _orig_mod.
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": compiled})
    assert set(load_file(path / "model.safetensors")) == set(model.state_dict())
    fresh = Tied()
    ckpt.load_checkpoint(path, {"model": torch.compile(fresh)})
    assert torch.equal(fresh.body.weight, model.body.weight)


def test_save_refuses_types_weights_only_cannot_load(tmp_path):
    model, *_ = _setup()
    with pytest.raises(VimError, match=r"extra\.rng.*ndarray"):
        ckpt.save_checkpoint(tmp_path, 1, {"model": model}, extra={"rng": np.zeros(3)})
    assert ckpt.list_checkpoints(tmp_path) == []


def test_not_written_when_not_main(tmp_path):
    model, *_ = _setup()
    assert ckpt.save_checkpoint(tmp_path / "c", 1, {"model": model}, write=False) is None
    assert not (tmp_path / "c").exists()


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte in the middle: same size, so only the checksum can tell
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :])


def test_latest_skips_broken_and_incomplete(tmp_path, caplog):
    model, opt, sched, ema = _setup()
    for step in (10, 20, 30):
        _save(tmp_path, step, model, opt, sched, ema, keep_last=None)
    (tmp_path / ".tmp-step-00000040-1-abc").mkdir()  # an interrupted save never counts
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000030"

    _damage(tmp_path / "step-00000030" / "model.safetensors", "flip")
    (tmp_path / "step-00000020" / "meta.json").unlink()  # crashed before meta.json was written
    with caplog.at_level(logging.WARNING, logger="vim_core.train.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000010"
    text = caplog.text
    assert "step-00000030/model.safetensors" in text and "sha256" in text
    assert "step-00000020/meta.json" in text
    assert ckpt.latest_checkpoint(tmp_path / "nowhere") is None


@pytest.mark.parametrize("fname", ["model.safetensors", "state.pt"])
@pytest.mark.parametrize("checksums", [True, False])
def test_truncated_file_is_one_line_vimerror(tmp_path, fname, checksums):
    model, opt, sched, ema = _setup()
    path = _save(tmp_path, 5, model, opt, sched, ema)
    _damage(path / fname, "truncate")
    if not checksums:
        # Also rewrite meta.json's size so the loader itself, not the size check, must notice.
        meta = json.loads((path / "meta.json").read_text())
        meta["files"][fname]["bytes"] = (path / fname).stat().st_size
        (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VimError) as err:
        ckpt.load_checkpoint(
            path, {"model": model, "ema": ema}, {"opt": opt}, {"sched": sched}, checksums=checksums
        )
    msg = str(err.value)
    assert "\n" not in msg and str(path / fname) in msg
    assert ("truncated" in msg) or ("corrupt" in msg)


def test_load_errors_name_the_problem(tmp_path):
    model, opt, sched, ema = _setup()
    path = _save(tmp_path, 5, model, opt, sched, ema)
    with pytest.raises(VimError, match="no weights named 'discriminator'.*ema, model"):
        ckpt.load_checkpoint(path, {"discriminator": model})
    with pytest.raises(VimError, match=r"model\.safetensors: weights do not fit"):
        ckpt.load_checkpoint(path, {"model": nn.Linear(6, 6)})
    with pytest.raises(VimError, match="no optimizers state for disc"):
        ckpt.load_checkpoint(path, {"model": model}, {"disc": opt})
    (path / "meta.json").unlink()
    with pytest.raises(VimError, match="meta.json: missing; the checkpoint is incomplete"):
        ckpt.load_checkpoint(path, {"model": model})


def test_keep_last_prunes_old_and_stale(tmp_path):
    model, *_ = _setup()
    (tmp_path / ".tmp-step-00000002-9-dead").mkdir(parents=True)
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, {"model": model}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]
    # saving a step that exists replaces it whole
    model.body.weight.data.add_(1.0)
    ckpt.save_checkpoint(tmp_path, 5, {"model": model}, keep_last=2)
    assert torch.equal(
        load_file(tmp_path / "step-00000005" / "model.safetensors")["body.weight"], model.body.weight
    )


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at `path` (made if missing) for the block; skips where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to make a small tmpfs")
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield path
    finally:
        # A file a failed test still holds open makes it busy: detach it lazily then, never leave it mounted.
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.mark.parametrize("where", ["weights", "state"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, where):
    model, opt, sched, ema = _setup()
    with tmpfs(tmp_path / "small", 128 * 1024) as root:
        first = _save(root, 1, model, opt, sched, ema, keep_last=None)
        big = {"model": nn.Linear(256, 256)} if where == "weights" else {"model": model}
        extra = {"filler": torch.zeros(64 * 1024)} if where == "state" else None
        with pytest.raises(VimError) as err:
            ckpt.save_checkpoint(root, 2, big, {"opt": opt}, extra=extra, keep_last=1)
        assert str(err.value) == (
            f"{root}: checkpoint write failed, no space left on device (step 2 not saved; the previous "
            "checkpoints are intact: free space and rerun to resume from the newest)"
        )
        assert sorted(p.name for p in root.iterdir()) == [first.name]  # no temp dir left behind
        assert ckpt.verify_checkpoint(first)["step"] == 1


def test_a_read_only_checkpoint_dir_is_one_line(tmp_path):
    model, *_ = _setup()
    with tmpfs(tmp_path / "ro", 1024 * 1024) as root:
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        with pytest.raises(VimError) as err:
            ckpt.save_checkpoint(root, 3, {"model": model})
        assert str(err.value) == f"{root}: checkpoint write failed (Read-only file system); step 3 not saved"


def test_maybe_resume_modes(tmp_path):
    model, opt, sched, ema = _setup()
    mods, opts, scheds = {"model": model, "ema": ema}, {"opt": opt}, {"sched": sched}
    assert ckpt.maybe_resume(tmp_path, "auto", mods, opts, scheds) == (0, {})
    _train(model, opt, sched, ema)
    _save(tmp_path, 3, model, opt, sched, ema)
    model2, opt2, sched2, ema2 = _setup(seed=5)
    step, extra = ckpt.maybe_resume(
        tmp_path, "auto", {"model": model2, "ema": ema2}, {"opt": opt2}, {"sched": sched2}
    )
    assert (step, extra["epoch"]) == (3, 1)
    assert torch.equal(model2.body.weight, model.body.weight)
    assert ckpt.maybe_resume(tmp_path, "never", mods, opts, scheds) == (0, {})
    assert ckpt.list_checkpoints(tmp_path) == []  # an old run's later steps must not outrank this run's
    with pytest.raises(VimError, match="resume must be"):
        ckpt.maybe_resume(tmp_path, "sometimes", mods)


# ---------------------------------------------------------------- a real SIGKILL


def _toy(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(TOY), *args],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_sigkill_resume_matches_uninterrupted_run(tmp_path):
    common = ["--steps", "40", "--every", "10", "--dropout", "0.1", "--noise", "0.05"]
    run = ["--ckpt-dir", "ck", "--out", "run", "--log-dir", "log", *common]
    # the uninterrupted reference, side by side with
    # 1) a run killed inside the save of step 20, after its files were written but before the rename
    ref = _toy(["--ckpt-dir", "ref_ck", "--out", "ref", *common], tmp_path)
    p = _toy([*run, "--die-in-save-at", "20"], tmp_path)
    p.communicate(timeout=120)
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    assert p.returncode == -signal.SIGKILL
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "ck")] == [10]
    assert any(c.name.startswith(".tmp-step-00000020") for c in (tmp_path / "ck").iterdir())

    # 2) resumed, then killed from outside at a random-ish step between checkpoints
    kill_at = random.Random(os.getpid()).randint(21, 37)
    p = _toy([*run, "--sleep", "0.05"], tmp_path)
    seen = []
    for line in p.stdout:
        seen.append(line.strip())
        if line.startswith(f"step {kill_at} "):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, (kill_at, seen, p.stderr.read())
    assert seen[0] == "start 10 {'epoch': 1}"
    resume_from = ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path / "ck"))
    assert resume_from in (20, 30) and resume_from <= kill_at + 1

    # 3) resumed to the end
    p = _toy(run, tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"start {resume_from} ")
    steps_run = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    assert steps_run == list(range(resume_from, 40)), f"killed at {kill_at}"

    want, got = load_file(tmp_path / "ref.rank0.safetensors"), load_file(tmp_path / "run.rank0.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs after kill at step {kill_at}"
    # every step logged exactly once despite the killed runs' rows past their checkpoints
    rows = (tmp_path / "log" / "plots" / "toy_loss.csv").read_text().splitlines()
    assert rows[0] == "step,mse" and [int(r.split(",")[0]) for r in rows[1:]] == list(range(40))


# ---------------------------------------------------------------- trackers


def test_jsonl_tracker_writes_dvc_csvs_and_resumes(tmp_path):
    t = JsonlTracker(tmp_path / "out", plots_dir=tmp_path / "plots", prefix="tokenizer")
    assert isinstance(t, Tracker) and isinstance(NullTracker(), Tracker)
    t.log_params({"model": {"dim": 64}, "lr": 1e-4})
    for step in range(5):
        t.log_metrics({"loss/total": torch.tensor(1.0 / (step + 1)), "loss/vq": 0.5, "lr": 1e-4 * step}, step)
    t.log_metrics({"loss/total": 0.1, "loss/perceptual": float("nan")}, 5)  # a new column appears
    loss = (tmp_path / "plots" / "tokenizer_loss.csv").read_text().splitlines()
    assert loss[0] == "step,total,vq,perceptual"
    assert loss[1] == "0,1.0,0.5," and loss[6] == "5,0.1,,nan"
    train = (tmp_path / "plots" / "tokenizer_train.csv").read_text().splitlines()
    assert train[0] == "step,lr" and len(train) == 6
    assert json.loads((tmp_path / "out" / "params.json").read_text()) == {"model.dim": 64, "lr": 1e-4}
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[5] == {"step": 5, "loss/total": 0.1, "loss/perceptual": None}

    # the checkpoint at step 3 logged its val loss (and a final eval figure came later, at 5)
    t.log_metrics({"eval/val_loss": 2.5}, 3)
    t.log_metrics({"eval/val_loss": 2.0, "eval/rfid": 7.0}, 5)

    # resumed from that checkpoint: rows 3..5 came after it and are dropped, then re-logged; the val
    # loss of step 3 was logged before the checkpoint was saved, so it stays (the resumed run will not
    # log it again), and so does nothing else of steps >= 3
    t2 = JsonlTracker(tmp_path / "out", plots_dir=tmp_path / "plots", prefix="tokenizer", start_step=3)
    t2.log_metrics({"loss/total": 9.0}, 3)
    loss = (tmp_path / "plots" / "tokenizer_loss.csv").read_text().splitlines()
    assert loss[0] == "step,total,vq,perceptual"
    assert [r.split(",")[0] for r in loss[1:]] == ["0", "1", "2", "3"] and loss[4] == "3,9.0,,"
    t2.log_metrics({"eval/val_loss": 1.5}, 6)
    val = (tmp_path / "plots" / "tokenizer_eval.csv").read_text().splitlines()
    assert val == ["step,val_loss,rfid", "3,2.5,", "6,1.5,"]
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 3, 6]
    assert records[3] == {"step": 3, "eval/val_loss": 2.5}

    # a fresh run (start_step 0) starts the files over
    JsonlTracker(tmp_path / "out", plots_dir=tmp_path / "plots", prefix="tokenizer").log_metrics(
        {"loss/vq": 2.0}, 0
    )
    assert (tmp_path / "plots" / "tokenizer_loss.csv").read_text().splitlines() == ["step,vq", "0,2.0"]


def test_tracker_images_artifacts_and_fanout(tmp_path):
    a, b = JsonlTracker(tmp_path / "a"), JsonlTracker(tmp_path / "b")
    multi = MultiTracker(a, b, NullTracker())
    img = np.zeros((3, 8, 10), dtype=np.uint8)
    img[0, :, :5] = 255
    multi.log_image(img, "grid")
    src = tmp_path / "weights.bin"
    src.write_bytes(b"abc")
    multi.log_artifact(src, name="w.bin")
    multi.log_metrics({"acc": 0.5}, 0)
    from PIL import Image

    for root in (tmp_path / "a", tmp_path / "b"):
        png = np.asarray(Image.open(root / "images" / "grid.png"))
        assert png.shape == (8, 10, 3) and png[0, 0, 0] == 255 and png[0, 9, 0] == 0
        assert (root / "artifacts" / "w.bin").read_bytes() == b"abc"
        assert (root / "plots" / "train.csv").read_text() == "step,acc\n0,0.5\n"


def test_code_digest_changes_with_the_sources(tmp_path, monkeypatch):
    """A checkpoint written by other model code must not be resumed: the fingerprint hashes the sources."""
    from vim_core.train import checkpoint

    pkg = tmp_path / "pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "model" / "net.py").write_text("WIDTH = 8\n")
    (pkg / "layers.py").write_text("pass\n")
    monkeypatch.setattr(checkpoint, "PACKAGE_ROOT", pkg)
    before = checkpoint.code_digest("model", "layers.py")
    assert before == checkpoint.code_digest("model", "layers.py")
    (pkg / "model" / "__pycache__").mkdir()
    (pkg / "model" / "__pycache__" / "net.cpython-311.pyc").write_bytes(b"\0")
    assert checkpoint.code_digest("model", "layers.py") == before, "bytecode caches are not sources"
    (pkg / "model" / "net.py").write_text("WIDTH = 16\n")
    assert checkpoint.code_digest("model", "layers.py") != before
