"""tokenize_dataset, the Transformer trainer, resume after SIGKILL, and the encode/decode/sample CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tests.test_tokenizer_trainer import micro_params
from vim_core.config import parse_params
from vim_core.data.prepare import prepare
from vim_core.data.shards import load_split, read_manifest
from vim_core.data.tokenize import tokenize_dataset
from vim_core.io import sha256_file
from vim_core.tokenizer.export import load_tokenizer
from vim_core.tokenizer.model import to_model_range
from vim_core.train.tokenizer_trainer import train_tokenizer
from vim_core.train.transformer_trainer import train_transformer
from vim_core.transformer.export import load_transformer

MICRO_VIM = {"layers": 2, "heads": 2, "dim": 32, "mlp_dim": 64, "num_classes": 10, "dropout": 0.0}


def stage2_params(tmp: Path, steps: int = 10, **train) -> dict:
    raw = micro_params(tmp)
    raw["tokenizer"]["loss"]["adversarial_weight"] = 0.0
    raw["transformer"] = {
        "model": MICRO_VIM,
        "train": {
            "steps": steps,
            "batch_size": 16,
            "checkpoint_every": 4,
            "threads": 1,
            "log_every": 1,
            "schedule": {
                "kind": "exponential",
                "peak_lr": 3e-3,
                "final_lr": 3e-4,
                "warmup_steps": 2,
                "decay_start": 4,
            },
            **train,
        },
        "tokens_dir": str(tmp / "tokens"),
        "out_dir": str(tmp / "vim"),
        "checkpoint_dir": str(tmp / "vim_ckpt"),
    }
    return raw


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("stage2")
    params = parse_params(stage2_params(tmp))
    prepare(params.data)
    train_tokenizer(params.tokenizer, params.data.out_dir, seed=0)
    tokenize_dataset(str(tmp / "model" / "tokenizer.safetensors"), params.data.out_dir, tmp / "tokens")
    return tmp


def test_tokenize_dataset_keeps_labels_and_records_tokenizer(stage2):
    manifest = read_manifest(stage2 / "tokens")
    tokenizer_path = stage2 / "model" / "tokenizer.safetensors"
    assert manifest["tokenizer_sha256"] == sha256_file(tokenizer_path)
    assert manifest["codebook_size"] == 64 and manifest["grid"] == [8, 8]
    tokens, labels = load_split(stage2 / "tokens", "test")
    images, image_labels = load_split(stage2 / "prepared", "test")
    assert tokens.dtype == np.uint16 and tokens.shape == (len(images), 64)
    assert np.array_equal(labels, image_labels)
    tok = load_tokenizer(str(tokenizer_path))
    with torch.inference_mode():
        again = tok.encode(to_model_range(images[:16])).numpy()
    assert np.array_equal(again, tokens[:16].astype(np.int64))


def test_train_transformer_metrics_and_export(stage2, tmp_path):
    raw = stage2_params(stage2)
    raw["transformer"]["out_dir"] = str(tmp_path / "vim")
    raw["transformer"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    run = train_transformer(parse_params(raw).transformer, seed=0, plots_dir=tmp_path / "plots")
    m = run.metrics
    assert m["steps"] == 10 and m["train_seconds"] > 0
    assert 0 < m["val_bits_per_token"] < 7.0  # below the 6 bits of a uniform guess over 64 codes, plus slack
    model, extra = load_transformer(str(run.model_path))
    assert extra["tokenizer_sha256"] == sha256_file(stage2 / "model" / "tokenizer.safetensors")
    assert model.num_classes == 10
    assert (tmp_path / "plots" / "transformer_loss.csv").read_text().count("\n") == 11


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vim_core.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_resume_after_sigkill(stage2, tmp_path):
    steps = 16
    works = {}
    for name in ("straight", "killed"):
        work = tmp_path / name
        work.mkdir()
        raw = stage2_params(stage2, steps=steps)
        raw["transformer"]["out_dir"] = str(work / "vim")
        raw["transformer"]["checkpoint_dir"] = str(work / "ckpt")
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        works[name] = work
    args = [
        "pretrain-transformer",
        "--params",
        "params.yaml",
        "--plots",
        "plots",
        "--metrics",
        "metrics.json",
    ]
    done = _cli(*args, cwd=works["straight"])
    assert done.returncode == 0, done.stderr

    work = works["killed"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vim_core.cli", *args],
        cwd=work,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(int(p.name.split("-")[1]) >= 8 for p in work.glob("ckpt/*/step-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(int(p.name.split("-")[1]) for p in work.glob("ckpt/*/step-*") if (p / "meta.json").exists())
    resumed = _cli(*args, cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["resumed_from"] == saved >= 8
    a = load_file(str(works["straight"] / "vim" / "transformer.safetensors"))
    b = load_file(str(work / "vim" / "transformer.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_encode_decode_sample(stage2, tmp_path):
    images, _ = load_split(stage2 / "prepared", "test", limit=5)
    files = []
    for i, img in enumerate(images):
        Image.fromarray(img[0]).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    tokenizer = stage2 / "model" / "tokenizer.safetensors"
    enc = _cli("encode", *files, "--tokenizer", tokenizer, "--out", tmp_path / "tokens.npz", cwd=tmp_path)
    assert enc.returncode == 0, enc.stderr
    with np.load(tmp_path / "tokens.npz") as npz:
        assert npz["tokens"].shape == (5, 64)
    dec = _cli(
        "decode", tmp_path / "tokens.npz", "--tokenizer", tokenizer, "--out", tmp_path / "out", cwd=tmp_path
    )
    assert dec.returncode == 0, dec.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i:06d}.png" for i in range(5)]

    raw = stage2_params(stage2)
    raw["transformer"]["out_dir"] = str(tmp_path / "vim")
    raw["transformer"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    model = train_transformer(parse_params(raw).transformer, seed=0).model_path
    smp = _cli(
        "sample",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--class",
        3,
        "-n",
        4,
        "--top-k",
        20,
        "--cfg",
        2.0,
        "--out",
        tmp_path / "grid.png",
        cwd=tmp_path,
    )
    assert smp.returncode == 0, smp.stderr
    assert Image.open(tmp_path / "grid.png").size[0] > 32

    (tmp_path / "cut.safetensors").write_bytes(Path(model).read_bytes()[:2000])
    bad = _cli(
        "sample",
        "--model",
        tmp_path / "cut.safetensors",
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "x.png",
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and "truncated" in bad.stderr and "Traceback" not in bad.stderr
    other = tmp_path / "other.safetensors"
    other.write_bytes(tokenizer.read_bytes())
    with open(other, "r+b") as f:  # same format, different weights: a different tokenizer
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x3f")
    bad = _cli("sample", "--model", model, "--tokenizer", other, "--out", tmp_path / "x.png", cwd=tmp_path)
    assert bad.returncode == 1 and "another tokenizer" in bad.stderr
    bad = _cli(
        "encode",
        tmp_path / "missing.png",
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "t.npz",
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and "missing.png" in bad.stderr and not (tmp_path / "t.npz").exists()
