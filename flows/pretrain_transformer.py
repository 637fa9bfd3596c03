"""Stage pretrain_transformer: train VIM on the token shards and export it."""

import sys

from prefect import task

from flows.common import run_stage, stage_flow
from flows.stages import Stage
from flows.tracking import tracker_for
from vim_core.config import Params


@task
def train(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Pretrain the Transformer on the token shards."""
    from vim_core.train.transformer_trainer import train_transformer

    tracker = tracker_for(run_id)
    run = train_transformer(params.transformer, seed=params.seed, tracker=tracker, plots_dir=stage.plots_dir)
    return run.metrics


pretrain_transformer_flow = stage_flow("pretrain_transformer", train)

if __name__ == "__main__":
    sys.exit(run_stage(pretrain_transformer_flow))
