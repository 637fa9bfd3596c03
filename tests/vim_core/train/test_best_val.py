"""Best-val selection: on a split the VIM can only memorise, the export is the lowest-val checkpoint's weights."""

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vim_core.config.pipeline import TransformerSection
from vim_core.data.shards import ShardWriter
from vim_core.train.checkpoint import list_checkpoints
from vim_core.train.run import BestVal
from vim_core.train.transformer_trainer import train_transformer
from vim_core.transformer.export import load_transformer

VOCAB, GRID = 16, (4, 4)


def noise_tokens(root: Path) -> None:
    """Uniform random tokens: nothing generalises, so every step past the first few only memorises train."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(root, shard_size=64, key="tokens")
    for split, n in (("train", 16), ("val", 32), ("test", 16)):
        for row in rng.integers(0, VOCAB, size=(n, GRID[0] * GRID[1]), dtype=np.uint16):
            writer.add(split, row, 0)
    writer.close({"codebook_size": VOCAB, "grid": list(GRID), "num_classes": 0, "class_names": []})


def section(tmp: Path, select: str) -> TransformerSection:
    return TransformerSection.model_validate(
        {
            "model": {"layers": 2, "heads": 2, "dim": 64, "mlp_dim": 128, "num_classes": 0, "dropout": 0.0},
            "train": {
                "steps": 40,
                "batch_size": 16,
                "checkpoint_every": 5,
                "keep_checkpoints": 20,
                "threads": 1,
                "weight_decay": 0.0,
                "cfg_dropout": 0.0,
                "select": select,
                "schedule": {"kind": "cosine", "peak_lr": 1e-2, "final_lr": 1e-2, "warmup_steps": 0},
            },
            "tokens_dir": str(tmp / "tokens"),
            "out_dir": str(tmp / f"vim_{select}"),
            "checkpoint_dir": str(tmp / "ckpt"),
        }
    )


def exported(path: Path) -> dict[str, torch.Tensor]:
    return load_transformer(str(path))[0].state_dict()


def test_export_is_the_best_val_checkpoint_on_an_overfit_run(tmp_path):
    noise_tokens(tmp_path / "tokens")
    best = train_transformer(section(tmp_path, "best_val"), seed=0, plots_dir=tmp_path / "plots")
    m = best.metrics
    assert 0 < m["best_val_step"] < 40  # memorising 16 sequences drives val bits up after an early low
    assert m["val_loss_final"] > m["best_val_loss"] + 0.1
    assert m["selected"] == f"best_val (step {m['best_val_step']})"
    curve = (tmp_path / "plots" / "transformer_val_loss.csv").read_text().splitlines()
    assert curve[0] == "step,val_loss" and [int(r.split(",")[0]) for r in curve[1:]] == list(range(5, 41, 5))
    assert abs(min(float(r.split(",")[1]) for r in curve[1:]) - m["best_val_loss"]) < 1e-4

    ckpts = dict(list_checkpoints(Path(best.model_path).parents[1] / "ckpt" / m["fingerprint"]))
    at_best = load_file(str(ckpts[m["best_val_step"]] / "model.safetensors"))
    at_last = load_file(str(ckpts[40] / "model.safetensors"))
    weights = exported(best.model_path)
    assert all(torch.equal(weights[k], at_best[k]) for k in at_best)
    assert not all(torch.equal(weights[k], at_last[k]) for k in at_last)

    # select: last resumes the same checkpoints (select is not in the fingerprint) and exports step 40.
    last = train_transformer(section(tmp_path, "last"), seed=0)
    assert last.metrics["resumed_from"] == 40 and last.metrics["selected"] == "last"
    assert last.metrics["best_val_step"] == m["best_val_step"]
    weights = exported(last.model_path)
    assert all(torch.equal(weights[k], at_last[k]) for k in at_last)


def test_only_checkpoints_past_after_step_can_be_chosen():
    """A tokenizer's GAN raises its reconstruction-only val loss when it starts: the pre-GAN low must not win."""
    module = torch.nn.Linear(2, 2)
    best = BestVal(module, after_step=100)
    for step, loss in ((50, 0.5), (100, 0.4), (150, 0.9), (200, 0.7), (250, 0.8)):
        with torch.no_grad():
            module.weight.fill_(step)
        best.record(step, loss, module)
    assert best.best == (200, 0.7) and best.metrics()["best_val_step"] == 200
    assert best.steps == [50, 100, 150, 200, 250]  # the whole curve is kept for the plot
    target = torch.nn.Linear(2, 2)
    best.copy_to(target)
    assert torch.all(target.weight == 200)
    assert BestVal(module, after_step=300).best is None
