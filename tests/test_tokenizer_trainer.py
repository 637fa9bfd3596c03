"""The tokenizer trainer end to end on real MNIST: metrics, exports, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vim_core.config import parse_params
from vim_core.data.prepare import prepare
from vim_core.tokenizer.export import load_tokenizer
from vim_core.train.tokenizer_trainer import train_tokenizer

MICRO_VIT = {"blocks": 1, "heads": 2, "dim": 32, "mlp_dim": 64}


def micro_params(tmp: Path, steps: int = 12, **train) -> dict:
    return {
        "seed": 3,
        "data": {"out_dir": str(tmp / "prepared"), "max_images": 1200},
        "tokenizer": {
            "model": {"encoder": MICRO_VIT, "decoder": MICRO_VIT, "codebook_size": 64, "code_dim": 8},
            "loss": {
                "adversarial_weight": 0.1,
                "discriminator": {"width": 8, "max_width": 16},
                "r1_every": 4,
            },
            "train": {
                "steps": steps,
                "batch_size": 16,
                "checkpoint_every": 4,
                "threads": 1,
                "log_every": 1,
                "schedule": {"kind": "cosine", "peak_lr": 1e-3, "final_lr": 1e-4, "warmup_steps": 2},
                **train,
            },
            "eval": {"max_test_images": 100, "usage_batch_size": 32, "grid_images": 8},
            "out_dir": str(tmp / "model"),
            "checkpoint_dir": str(tmp / "ckpt"),
        },
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    prepare(parse_params(micro_params(tmp)).data)
    return tmp


def test_train_evaluate_export(prepared, tmp_path):
    raw = micro_params(prepared)
    raw["tokenizer"]["out_dir"] = str(tmp_path / "model")
    raw["tokenizer"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    params = parse_params(raw)
    run = train_tokenizer(
        params.tokenizer, params.data.out_dir, seed=params.seed, plots_dir=tmp_path / "plots"
    )
    m = run.metrics
    for key in ("codebook_usage", "codebook_perplexity", "psnr", "l2", "l1", "steps", "train_seconds"):
        assert key in m
    assert m["steps"] == 12 and 0 < m["codebook_usage"] <= 1 and m["psnr"] > 5
    assert "per batch of 32 test images" in m["codebook_usage_definition"]
    loss_csv = (tmp_path / "plots" / "tokenizer_loss.csv").read_text().splitlines()
    assert loss_csv[0].startswith("step,") and "adversarial" in loss_csv[0] and len(loss_csv) == 13
    assert (tmp_path / "plots" / "tokenizer_reconstructions.png").stat().st_size > 0
    reloaded = load_tokenizer(str(run.model_path))
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    assert torch.equal(reloaded.encode(x), run.model.encode(x))


def _cli(params_file: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vim_core.cli",
            "train-tokenizer",
            "--params",
            str(params_file),
            "--plots",
            str(cwd / "plots"),
            "--metrics",
            str(cwd / "metrics.json"),
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_resume_after_sigkill_matches_uninterrupted_run(prepared, tmp_path):
    steps = 24
    runs = {}
    for name in ("straight", "killed"):
        work = tmp_path / name
        work.mkdir()
        raw = micro_params(prepared, steps=steps)
        raw["tokenizer"]["out_dir"] = str(work / "model")
        raw["tokenizer"]["checkpoint_dir"] = str(work / "ckpt")
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        runs[name] = work

    straight = _cli(runs["straight"] / "params.yaml", runs["straight"])
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    work = runs["killed"]
    proc = _cli(work / "params.yaml", work)
    deadline = time.monotonic() + 300
    ckpts: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = sorted(work.glob("ckpt/*/step-*"))
        if any(int(p.name.split("-")[1]) >= 8 for p in ckpts):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "metrics.json").exists()
    saved = max(int(p.name.split("-")[1]) for p in work.glob("ckpt/*/step-*") if (p / "meta.json").exists())
    assert 8 <= saved < steps

    resumed = _cli(work / "params.yaml", work)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["resumed_from"] == saved
    a = load_file(str(runs["straight"] / "model" / "tokenizer.safetensors"))
    b = load_file(str(work / "model" / "tokenizer.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    rows = (work / "plots" / "tokenizer_loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(steps))
