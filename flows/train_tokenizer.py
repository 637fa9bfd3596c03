"""Stage train_tokenizer: train the ViT-VQGAN on data/prepared, evaluate it, export it."""

import sys

from prefect import task

from flows.common import run_stage, stage_flow
from flows.stages import Stage
from flows.tracking import tracker_for
from vim_core.config import Params


@task
def train(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Train the tokenizer, then score its reconstructions."""
    from vim_core.train.tokenizer_trainer import train_tokenizer

    tracker = tracker_for(run_id)
    run = train_tokenizer(
        params.tokenizer, params.data.out_dir, seed=params.seed, tracker=tracker, plots_dir=stage.plots_dir
    )
    return run.metrics


train_tokenizer_flow = stage_flow("train_tokenizer", train)

if __name__ == "__main__":
    sys.exit(run_stage(train_tokenizer_flow))
