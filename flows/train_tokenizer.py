"""Stage train_tokenizer: train the ViT-VQGAN on data/prepared, evaluate it, export it."""

import json
import sys

from prefect import flow, task

from flows.common import failed_on_bad_input, run_stage, tracked_stage
from vim_core.config import Params, load_params
from vim_core.io import atomic_write_text

METRICS = "metrics/tokenizer.json"
PLOTS = "plots"


@task
def train(params: Params, run_id: str | None = None) -> dict:
    from flows.tracking import tracker_for
    from vim_core.train.tokenizer_trainer import train_tokenizer

    run = train_tokenizer(
        params.tokenizer,
        params.data.out_dir,
        seed=params.seed,
        tracker=tracker_for(run_id),
        plots_dir=PLOTS,
    )
    return run.metrics


@flow(name="train_tokenizer")
def train_tokenizer_flow(params_path: str = "params.yaml"):
    """Train the tokenizer, then write metrics/tokenizer.json."""
    return failed_on_bad_input(_train_tokenizer, params_path)


def _train_tokenizer(params_path: str) -> dict:
    params = load_params(params_path)
    with tracked_stage("train_tokenizer", params) as tracker:
        metrics = train(params, tracker.run_id)
        atomic_write_text(METRICS, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(train_tokenizer_flow))
