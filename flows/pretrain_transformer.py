"""Stage pretrain_transformer: train VIM on the token shards and export it."""

import sys

from flows.common import run_stage
from flows.ranks import run_ranks, transformer_rank, worker_node
from flows.stages import Stage, declared
from vim_core.config import Params


def train(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Pretrain the Transformer on the token shards (on every rank, with train.processes > 1)."""
    return run_ranks(transformer_rank, params, params.transformer.train.processes, stage.plots_dir, run_id)


def worker(params: Params) -> None:
    """This machine's ranks, on a machine other than node 0."""
    stage = declared("pretrain_transformer")
    worker_node(transformer_rank, params.transformer.train.processes, params, stage.plots_dir)


if __name__ == "__main__":
    sys.exit(run_stage("pretrain_transformer", train, worker_node=worker))
