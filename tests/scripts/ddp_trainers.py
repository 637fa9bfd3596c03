"""The real trainers, run directly or under torchrun, for tests/vim_core/train/test_ddp_trainers.py.

Runs train_tokenizer, then train_transformer, from a params JSON file. Every rank writes
<out>.rank<r>.json (losses its tracker saw, the trainers' metrics, the tracker calls it got) and
<out>.rank<r>.<stage>.safetensors (its final weights). A "{rank}" in the params' paths becomes the
rank, so a test can see whether a non-zero rank wrote anything. --stop-at K simulates a preemption:
each stage stops right after its checkpoint at step K, on every rank. Not collected by pytest.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from vim_core.config import parse_params
from vim_core.train import distributed as vdist
from vim_core.train import run as train_run
from vim_core.train import tokenizer_trainer, transformer_trainer
from vim_core.train.tracking import NullTracker


class Preempted(Exception):
    pass


class RecordingTracker(NullTracker):
    def __init__(self):
        self.calls: dict[str, int] = {}
        self.losses: dict[int, float] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def log_params(self, params: dict) -> None:
        self._count("log_params")

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._count("log_metrics")
        for key in ("loss/total", "loss/train"):
            if key in metrics:
                self.losses[step] = float(metrics[key])


def stop_after(module, stop_at: int) -> None:
    """Make module.save_checkpoint raise Preempted once the checkpoint of step `stop_at` is written.

    Both trainers save through vim_core.train.run's checkpointer, so patching that module stops either.
    """
    real = module.save_checkpoint

    def save(ckpt_dir, step, *args, **kwargs):
        out = real(ckpt_dir, step, *args, **kwargs)
        if step == stop_at:
            raise Preempted(step)
        return out

    module.save_checkpoint = save


def capture_discriminator() -> dict:
    """The trainer's discriminator, which it does not return; to compare it across ranks."""
    box: dict = {}
    real = tokenizer_trainer.Discriminator

    class Captured(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            box["disc"] = self

    tokenizer_trainer.Discriminator = Captured
    return box


def weights(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", required=True, help="raw params as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--stop-at", type=int, default=-1)
    args = p.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    raw = json.loads(Path(args.params).read_text().replace("{rank}", str(rank)))
    plots = raw.pop("plots")
    params = parse_params(raw)
    if args.stop_at >= 0:
        stop_after(train_run, args.stop_at)
    disc = capture_discriminator()
    report: dict = {}

    tracker = RecordingTracker()
    try:
        run = tokenizer_trainer.train_tokenizer(
            params.tokenizer, params.data.out_dir, seed=params.seed, tracker=tracker, plots_dir=plots
        )
        report["tokenizer_metrics"] = run.metrics
        model = run.model
    except Preempted:
        model = None
    report["tokenizer"] = {"losses": tracker.losses, "calls": tracker.calls}
    if model is not None:
        save_file(
            weights(model, "model") | weights(disc["disc"], "disc"),
            f"{args.out}.rank{rank}.tokenizer.safetensors",
        )

    tracker = RecordingTracker()
    try:
        run = transformer_trainer.train_transformer(
            params.transformer, seed=params.seed, tracker=tracker, plots_dir=plots
        )
        report["transformer_metrics"] = run.metrics
        save_file(weights(run.model, "model"), f"{args.out}.rank{rank}.transformer.safetensors")
    except Preempted:
        pass
    report["transformer"] = {"losses": tracker.losses, "calls": tracker.calls}

    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    vdist.cleanup()


if __name__ == "__main__":
    main()
