"""The training stages' ranks: what each process runs when a stage trains on several processes or machines.

A stage with `train.processes` > 1 (or PET_NNODES > 1) launches these through vim_core.train.launch, the
stage process being torch's elastic agent for its machine. Rank 0 logs to the stage's MLflow run (flushing
its own outbox before it returns, as a rank is a process of its own); the other ranks track nothing.
This module imports no Prefect, so a spawned rank starts quickly.
"""

import logging
import os
import sys

from flows import outbox
from flows.outbox import warning_line
from flows.tracking import tracker_for
from vim_core.config import Params
from vim_core.train import distributed as vdist


def _rank_tracker(run_id: str | None):
    """Rank 0's tracker; a spawned rank starts with no logging set up, so rank 0 also prints its progress
    lines (vim_core.progress) as the stage process would."""
    if os.environ.get("RANK", "0") != "0":
        return None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    outbox.FOLDER_SUFFIX = "-rank0"
    return tracker_for(run_id)


def _flush(tracker, stage: str) -> None:
    box = getattr(tracker, "outbox", None)
    if box is not None:
        left = box.close()
        if left:
            print(warning_line(box, left, stage), file=sys.stderr)


def _on_rank(stage: str, train, run_id: str | None, spawned: bool) -> dict:
    """train(tracker) in this process. A spawned rank is a process of its own: rank 0 flushes its own
    outbox before it returns. In the stage's own process the stage's run closes the shared outbox."""
    if not spawned:
        return train(tracker_for(run_id))
    tracker = _rank_tracker(run_id)
    try:
        return train(tracker)
    finally:
        _flush(tracker, stage)
        vdist.cleanup()


def tokenizer_rank(params: Params, plots_dir: str, run_id: str | None, spawned: bool = True) -> dict:
    """Train the tokenizer on this rank; every rank returns the run's metrics (rank 0's are the ones kept)."""
    from vim_core.train.tokenizer_trainer import train_tokenizer

    def train(tracker) -> dict:
        section, data = params.tokenizer, params.data.out_dir
        return train_tokenizer(section, data, seed=params.seed, tracker=tracker, plots_dir=plots_dir).metrics

    return _on_rank("train_tokenizer", train, run_id, spawned)


def transformer_rank(params: Params, plots_dir: str, run_id: str | None, spawned: bool = True) -> dict:
    """Pretrain VIM on this rank, then its unconditional copy when transformer.uncond is set; as
    tokenizer_rank."""
    from vim_core.train.transformer_trainer import train_with_uncond_copy

    def train(tracker) -> dict:
        return train_with_uncond_copy(
            params.transformer, seed=params.seed, tracker=tracker, plots_dir=plots_dir
        ).metrics

    return _on_rank("pretrain_transformer", train, run_id, spawned)


def run_ranks(entry, params: Params, processes: int | str, plots_dir: str, run_id: str | None) -> dict:
    """`entry` on this process alone, or on every rank when the stage trains distributed; the metrics."""
    from vim_core.train.launch import distributed_requested, launch, resolve_processes

    n = resolve_processes(processes)
    if not distributed_requested(n):
        return entry(params, plots_dir, run_id, spawned=False)
    results = launch(entry, (params, plots_dir, run_id), n)
    return results.get(0, {})


def worker_node(entry, processes: int | str, params: Params, plots_dir: str) -> None:
    """A machine other than node 0 (PET_NODE_RANK > 0): it runs its ranks and writes and tracks nothing."""
    from vim_core.train.launch import launch, resolve_processes

    launch(entry, (params, plots_dir, None), resolve_processes(processes))
