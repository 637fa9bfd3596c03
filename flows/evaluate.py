"""Stage evaluate: generation, reconstruction and probe metrics into metrics/eval.json, grids into plots/."""

import json
import sys

from prefect import flow, task

from flows.common import failed_on_bad_input, run_stage, tracked_stage
from flows.mlflow_run import set_run_tags
from vim_core.config import Params, load_params
from vim_core.io import atomic_write_text

METRICS = "metrics/eval.json"


@task
def score(params: Params) -> dict:
    from vim_core.eval.report import evaluate

    return evaluate(params, plots_dir="plots")


@flow(name="evaluate")
def evaluate_flow(params_path: str = "params.yaml"):
    """Score the tokenizer and the Transformer, then write metrics/eval.json."""
    return failed_on_bad_input(_evaluate, params_path)


def _evaluate(params_path: str) -> dict:
    params = load_params(params_path)
    with tracked_stage("evaluate", params) as tracker:
        metrics = score(params)
        atomic_write_text(METRICS, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        # the hash that decides which registry versions compare (flows/registry.py)
        set_run_tags(tracker.run_id, {"vim.eval_config_hash": metrics["eval_config_hash"]})
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(evaluate_flow))
