"""Stage train_tokenizer: train the ViT-VQGAN on data/prepared, evaluate it, export it."""

import sys

from flows.common import run_stage
from flows.ranks import run_ranks, tokenizer_rank, worker_node
from flows.stages import Stage, declared
from vim_core.config import Params


def train(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Train the tokenizer (on every rank, with train.processes > 1), then score its reconstructions."""
    return run_ranks(tokenizer_rank, params, params.tokenizer.train.processes, stage.plots_dir, run_id)


def worker(params: Params) -> None:
    """This machine's ranks, on a machine other than node 0."""
    worker_node(
        tokenizer_rank, params.tokenizer.train.processes, params, declared("train_tokenizer").plots_dir
    )


if __name__ == "__main__":
    sys.exit(run_stage("train_tokenizer", train, worker_node=worker))
