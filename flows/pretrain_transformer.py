"""Stage pretrain_transformer: train VIM on the token shards and export it."""

import json
import sys

from prefect import flow, task

from flows.common import failed_on_bad_input, run_stage, tracked_stage
from vim_core.config import Params, load_params
from vim_core.io import atomic_write_text

METRICS = "metrics/transformer.json"


@task
def train(params: Params, run_id: str | None = None) -> dict:
    from flows.tracking import tracker_for
    from vim_core.train.transformer_trainer import train_transformer

    run = train_transformer(
        params.transformer, seed=params.seed, tracker=tracker_for(run_id), plots_dir="plots"
    )
    return run.metrics


@flow(name="pretrain_transformer")
def pretrain_transformer_flow(params_path: str = "params.yaml"):
    """Pretrain the Transformer, then write metrics/transformer.json."""
    return failed_on_bad_input(_pretrain, params_path)


def _pretrain(params_path: str) -> dict:
    params = load_params(params_path)
    with tracked_stage("pretrain_transformer", params) as tracker:
        metrics = train(params, tracker.run_id)
        atomic_write_text(METRICS, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(pretrain_transformer_flow))
