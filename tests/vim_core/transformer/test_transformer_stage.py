"""tokenize_dataset, the Transformer trainer, and the encode/decode/sample CLI (resume: test_trainer_run.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.vim_core.train.test_tokenizer_trainer import micro_params
from vim_core.config import parse_params
from vim_core.data.shards import load_split, read_manifest
from vim_core.io import sha256_file
from vim_core.tokenizer.export import load_tokenizer
from vim_core.tokenizer.model import to_model_range
from vim_core.train.transformer_trainer import train_transformer, train_with_uncond_copy
from vim_core.transformer.export import load_transformer

REPO = Path(__file__).resolve().parents[3]
# The CLI runs in a temp dir: PYTHONPATH makes it import this checkout, not whichever one pip installed.
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
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
            "cfg_dropout": 0.1,  # the embedded default's label dropout
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


def test_an_unconditional_copy_trains_from_the_class_conditional_vim(stage2, tmp_path):
    """transformer.uncond: a copy started from the class-conditional VIM begins at its null-class val
    loss (far below a fresh VIM's), trains on unlabelled sequences and exports an unconditional VIM."""
    raw = stage2_params(stage2)
    raw["transformer"].update(out_dir=str(tmp_path / "vim"), checkpoint_dir=str(tmp_path / "ckpt"))
    schedule = {"kind": "exponential", "peak_lr": 1e-3, "final_lr": 1e-4, "warmup_steps": 1, "decay_start": 1}
    raw["transformer"]["uncond"] = {"steps": 4, "schedule": schedule}
    section = parse_params(raw).transformer
    both = train_with_uncond_copy(section, seed=0, plots_dir=tmp_path / "plots")
    copy = both.metrics["uncond"]
    fresh = train_transformer(section.uncond_section().model_copy(update={"out_dir": str(tmp_path / "new")}))
    model, _ = load_transformer(str(tmp_path / "vim" / "uncond" / "transformer.safetensors"))
    assert model.num_classes == 0 and load_transformer(str(both.model_path))[0].num_classes == 10
    assert copy["steps"] == 4 and copy["fingerprint"] not in (
        fresh.metrics["fingerprint"],
        both.metrics["fingerprint"],
    )
    curve = (tmp_path / "vim" / "uncond" / "plots" / "transformer_val_loss.csv").read_text().splitlines()
    assert curve[0] == "step,val_loss" and len(curve) == 2  # one checkpoint, at step 4
    assert copy["best_val_loss"] < fresh.metrics["best_val_loss"] - 0.5  # 4.0 vs 5.1 here


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vim_core.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=CLI_ENV,
    )


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
