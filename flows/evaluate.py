"""Stage evaluate: generation, reconstruction and probe metrics, and the sample and reconstruction grids."""

import sys

from flows.common import run_stage
from flows.outbox import set_run_tags
from flows.stages import Stage
from vim_core.config import Params


def score(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Score the tokenizer and the Transformer."""
    from vim_core.eval.report import evaluate

    metrics = evaluate(params, plots_dir=stage.plots_dir)
    # the hash that decides which registry versions compare (flows.registry)
    set_run_tags(run_id, {"vim.eval_config_hash": metrics["eval_config_hash"]})
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", score))
