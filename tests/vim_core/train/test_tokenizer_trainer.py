"""The tokenizer trainer end to end on real MNIST: metrics and exports (resume: test_trainer_run.py)."""

from pathlib import Path

import pytest
import torch

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
    val_csv = (tmp_path / "plots" / "tokenizer_val_loss.csv").read_text().splitlines()
    val = {int(r.split(",")[0]): float(r.split(",")[1]) for r in val_csv[1:]}
    every = params.tokenizer.train.checkpoint_every
    assert val_csv[0] == "step,val_loss" and sorted(val) == sorted({*range(every, 13, every), 12})
    assert m["best_val_step"] in val and abs(m["best_val_loss"] - min(val.values())) < 1e-4
    assert m["selected"] == f"best_val (step {m['best_val_step']})" and m["val_loss_final"] == round(
        val[12], 4
    )
    reloaded = load_tokenizer(str(run.model_path))
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    assert torch.equal(reloaded.encode(x), run.model.encode(x))


def test_the_export_is_chosen_among_gan_trained_checkpoints(prepared, tmp_path):
    """With the GAN starting at step 4 of 12, the val curve has steps 4, 8 and 12, but the export is 8 or 12."""
    raw = micro_params(prepared)
    raw["tokenizer"]["loss"]["adversarial_start_step"] = 4
    raw["tokenizer"]["out_dir"] = str(tmp_path / "model")
    raw["tokenizer"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    params = parse_params(raw)
    m = train_tokenizer(params.tokenizer, params.data.out_dir, seed=params.seed, plots_dir=tmp_path).metrics
    val_csv = (tmp_path / "tokenizer_val_loss.csv").read_text().splitlines()[1:]
    val = {int(r.split(",")[0]): float(r.split(",")[1]) for r in val_csv}
    assert sorted(val) == [4, 8, 12] and m["best_val_step"] in (8, 12)
    assert abs(m["best_val_loss"] - min(val[8], val[12])) < 1e-4


def test_the_vqgan_vanilla_arm_trains(prepared, tmp_path):
    """studies/generation.yaml's vqgan-vanilla tokenizer settings validate and train: the paper's vanilla
    VQGAN (CNN, full-dimension unnormalized codes, normal init, no restarts, one learning rate)."""
    import yaml

    from vim_core.config import apply_overrides

    study = yaml.safe_load((Path(__file__).resolve().parents[3] / "studies" / "generation.yaml").read_text())
    model = {
        k: v
        for k, v in study["arms"]["vqgan-vanilla"]["overrides"].items()
        if k.startswith("tokenizer.model.")
    }
    assert model == {
        "tokenizer.model.arch": "cnn",
        "tokenizer.model.code_dim": None,
        "tokenizer.model.l2_normalize": False,
        "tokenizer.model.codebook_init": "normal",
        "tokenizer.model.dead_code_threshold": 0.0,
        "tokenizer.model.codebook_lr_multiplier": 1.0,
    }
    raw = micro_params(prepared, steps=3)
    raw["tokenizer"]["out_dir"] = str(tmp_path / "model")
    raw["tokenizer"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    params = apply_overrides(
        parse_params(raw), [f"{k}={yaml.safe_dump(v).strip()}" for k, v in model.items()]
    )
    cfg = params.tokenizer.model
    assert (cfg.arch, cfg.code_dim, cfg.l2_normalize, cfg.codebook_init) == ("cnn", None, False, "normal")
    run = train_tokenizer(
        params.tokenizer, params.data.out_dir, seed=params.seed, plots_dir=tmp_path / "plots"
    )
    q = run.model.quantizer
    assert run.metrics["steps"] == 3 and run.metrics["psnr"] > 0
    assert isinstance(q.proj_in, torch.nn.Identity) and q.code_dim == cfg.cnn.z_channels
    assert not q.l2_normalize and q.dead_code_threshold == 0.0
    assert torch.isfinite(q.codebook).all()
