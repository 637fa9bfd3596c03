"""Shared training infrastructure: checkpoints and resume, lr schedulers, EMA, safety checks, trackers, DDP."""

from vim_core.train.checkpoint import latest_checkpoint, load_checkpoint, maybe_resume, save_checkpoint
from vim_core.train.distributed import DistInfo, init_distributed, is_main, unwrap, wrap_ddp
from vim_core.train.loop import (
    EMA,
    autocast_context,
    check_finite,
    clip_grad,
    maybe_compile,
    progress,
    resumable_batches,
    set_seed,
)
from vim_core.train.schedule import make_scheduler
from vim_core.train.tracking import JsonlTracker, MultiTracker, NullTracker, Tracker

__all__ = [
    "EMA",
    "DistInfo",
    "JsonlTracker",
    "MultiTracker",
    "NullTracker",
    "Tracker",
    "autocast_context",
    "check_finite",
    "clip_grad",
    "init_distributed",
    "is_main",
    "latest_checkpoint",
    "load_checkpoint",
    "make_scheduler",
    "maybe_compile",
    "maybe_resume",
    "progress",
    "resumable_batches",
    "save_checkpoint",
    "set_seed",
    "unwrap",
    "wrap_ddp",
]
