"""The run skeleton every trainer shares: set-up, step budget, trackers, data stream and the step loop.

A trainer supplies what is its own (the model, one optimisation step, its evaluation); everything that
decides *how long* and *on what* it trains lives here once, so the tokenizer, VIM and any later trainer
resume, log and checkpoint the same way (and count FLOPs the same way, through vim_core.train.flops).
"""

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vim_core.config.training import TrainLoopConfig
from vim_core.data.shards import iter_batches
from vim_core.errors import VimError
from vim_core.io import atomic_write_text
from vim_core.progress import Progress
from vim_core.train import distributed as vdist
from vim_core.train.checkpoint import save_checkpoint
from vim_core.train.loop import enable_tf32, progress, resumable_batches
from vim_core.train.tracking import CHECKPOINT_KEYS, JsonlTracker, MultiTracker, NullTracker, Tracker


@dataclass
class TrainRun:
    """What a trainer returns: the weights that were evaluated, the metrics JSON and the export path."""

    model: nn.Module
    metrics: dict
    model_path: Path


@dataclass
class RunContext:
    """Where and how a run trains: the DDP rank layout, the device, and this rank's share of the batch."""

    info: vdist.DistInfo
    local_batch: int

    @property
    def device(self) -> torch.device:
        return self.info.device


def start_run(t: TrainLoopConfig, section: str, n_train: int, source: str | Path) -> RunContext:
    """Join the process group (under torchrun), pick the device and threads, and check the batch fits."""
    info = vdist.init_distributed(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    enable_tf32(info.device)
    if t.batch_size % info.world_size:
        raise VimError(
            f"{section}.train.batch_size {t.batch_size} must divide by the {info.world_size} ranks"
        )
    if n_train < t.batch_size:
        raise VimError(f"{source}: {n_train} train examples, fewer than one batch of {t.batch_size}")
    return RunContext(info, t.batch_size // info.world_size)


def fingerprint(spec: dict) -> str:
    """Checkpoints resume only into a run whose spec (config, data, seed, code) hashes the same."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def open_tracker(
    ctx: RunContext,
    tracker: Tracker | None,
    out_dir: str | Path,
    plots_dir: str | Path | None,
    prefix: str,
    start: int,
) -> Tracker:
    """Rank 0 logs to `tracker` and, with plots_dir, to JSONL/CSV rewritten from the resumed step on."""
    if not ctx.info.is_main:
        return NullTracker()
    trackers = [tracker] if tracker is not None else []
    if plots_dir is not None:
        trackers.append(JsonlTracker(Path(out_dir) / "log", plots_dir, prefix=prefix, start_step=start))
    return MultiTracker(*trackers) if trackers else NullTracker()


def train_batches(
    ctx: RunContext, root: str | Path, batch_size: int, n_train: int, seed: int, start: int
) -> Iterator[tuple[int, object]]:
    """This rank's endless (epoch, batch) stream over the train split, resumed at step `start`."""

    def epoch(e: int):
        return iter_batches(
            root,
            "train",
            ctx.local_batch,
            seed=seed * 100_003 + e,
            rank=ctx.info.rank,
            world_size=ctx.info.world_size,
            drop_last=True,
        )

    return resumable_batches(epoch, start, batches_per_epoch=n_train // batch_size)


# ---------------------------------------------------------------------------------------------------------
# The loop.


STEP_RANGE = "train_step"  # the profiler range of one training step


def step_time_metrics(step_seconds: list[float], phases: list[tuple[int, int]], start: int) -> dict:
    """Median wall seconds per step (per phase, when the step's cost changes part-way) and the first
    step's, for the metrics JSON; the median skips the first 3 steps of a phase (warm-up, compilation)."""
    if not step_seconds:
        return {}
    out = {"first_step_seconds": round(step_seconds[0], 4)}
    bounds = [b for b, _ in phases] + [start + len(step_seconds)]
    medians = []
    for begin, end in zip(bounds, bounds[1:], strict=False):
        times = step_seconds[max(begin - start, 0) : max(end - start, 0)]
        times = times[3:] if len(times) > 6 else times
        if times:
            medians.append({"from_step": begin, "seconds": round(float(np.median(times)), 4)})
    if medians:
        out["step_seconds_median"] = medians[0]["seconds"] if len(phases) == 1 else medians
    return out


@dataclass
class StepResult:
    """One step's losses (averaged over ranks when logged, as loss/NAME) and extra metrics, already named."""

    losses: dict[str, torch.Tensor]
    extra: dict = field(default_factory=dict)


def run_steps(
    ctx: RunContext,
    t: TrainLoopConfig,
    steps: int,
    start: int,
    batches: Iterator,
    step_fn: Callable[[int, object], StepResult],
    checkpoint: Callable[[int], None],
    tracker: Tracker,
    desc: str,
    step_seconds: list[float] | None = None,
) -> float:
    """Steps start..steps-1: step, log every log_every steps, checkpoint; returns the training seconds.

    Each step (its batch read included) runs inside a `train_step` profiler range, so a torch.profiler
    around a whole run can tell the steps' ops from set-up and evaluation; with `step_seconds`, each
    step's wall time is appended to it (the first ones carry torch.compile's compilation).
    """
    started = time.monotonic()
    bar = progress(total=steps, initial=start, desc=desc)
    lines = Progress(desc, steps, done=start, enabled=ctx.info.is_main)  # the bar's twin for logs
    shown = None
    for step in range(start, steps):
        began = time.perf_counter()
        with torch.profiler.record_function(STEP_RANGE):
            _, batch = next(batches)
            result = step_fn(step, batch)
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - began)
        bar.update(1)
        if step % t.log_every == 0 or step == steps - 1:
            # The global batch's losses: a collective, so every rank joins; only rank 0 logs.
            losses = vdist.all_reduce_mean_dict(result.losses)
            if ctx.info.is_main:
                metrics = {f"loss/{k}": v for k, v in losses.items()}
                metrics.update(result.extra)
                tracker.log_metrics(metrics, step)
                shown = float(losses.get("total", next(iter(losses.values()))))
                bar.set_postfix(loss=f"{shown:.4f}")
        lines.update(1, loss=shown)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
    bar.close()
    return time.monotonic() - started


def checkpointer(
    ckpt_dir: Path, modules: dict, optimizers: dict, schedulers: dict, keep_last: int
) -> Callable[[int], None]:
    """save_checkpoint bound to one run's state."""

    def save(step: int) -> None:
        save_checkpoint(ckpt_dir, step, modules, optimizers, schedulers, keep_last=keep_last)

    return save


class BestVal:
    """The val curve and the lowest-val weights so far; checkpointed like a module, so a resume keeps them.

    Stateful: its state dict holds the best weights under `weights.NAME`, and the curve as tensors, so
    a run killed and resumed exports the same bytes as an uninterrupted one.

    `after_step`: only checkpoints past this step may be chosen (the whole curve is still kept). A
    tokenizer's val loss scores reconstruction alone, and its GAN raises that loss when it starts, so
    weights from before the GAN would always win against weights trained on the full objective.
    """

    def __init__(self, module: nn.Module, after_step: int = 0):
        state = vdist.unwrap(module).state_dict()
        self.weights = {k: v.detach().to("cpu").clone() for k, v in state.items()}
        self.after_step = int(after_step)
        self.steps: list[int] = []
        self.losses: list[float] = []

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, val loss) of the lowest eligible val loss; the earliest step wins a tie."""
        eligible = [j for j, s in enumerate(self.steps) if s > self.after_step]
        if not eligible:
            return None
        i = min(eligible, key=lambda j: (self.losses[j], j))
        return self.steps[i], self.losses[i]

    def record(self, step: int, loss: float, module: nn.Module) -> None:
        """Add a point to the curve, and keep the module's weights if it is the new best."""
        best = self.best
        improved = step > self.after_step and (best is None or loss < best[1])
        self.steps.append(int(step))
        self.losses.append(float(loss))
        if improved:
            state = vdist.unwrap(module).state_dict()
            self.weights = {k: v.detach().to("cpu").clone() for k, v in state.items()}

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        vdist.unwrap(module).load_state_dict(self.weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"weights.{k}": v for k, v in self.weights.items()}
        out["curve.step"] = torch.tensor(self.steps, dtype=torch.int64)
        out["curve.loss"] = torch.tensor(self.losses, dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weights = {k.removeprefix("weights."): v for k, v in state.items() if k.startswith("weights.")}
        if set(weights) != set(self.weights):
            raise RuntimeError("best-val weights do not match the model's keys")
        self.weights = {k: v.clone() for k, v in weights.items()}
        self.steps = [int(s) for s in state["curve.step"].tolist()]
        self.losses = [float(v) for v in state["curve.loss"].tolist()]

    def metrics(self) -> dict:
        """best_val_step, best_val_loss and val_loss_final for the metrics JSON ({} before any val)."""
        if self.best is None:
            return {}
        step, loss = self.best
        return {
            "best_val_step": step,
            "best_val_loss": round(loss, 4),
            "val_loss_final": round(self.losses[-1], 4),
        }

    def write_csv(self, path: str | Path) -> None:
        """The val curve as step,val_loss (a DVC plot), written atomically."""
        rows = "".join(f"{s},{v:.6f}\n" for s, v in zip(self.steps, self.losses, strict=True))
        atomic_write_text(path, "step,val_loss\n" + rows)


def validating_checkpointer(
    save: Callable[[int], None],
    best: BestVal,
    exported: Callable[[], contextlib.AbstractContextManager[nn.Module]],
    val_loss: Callable[[nn.Module], float],
    tracker: Tracker,
) -> Callable[[int], None]:
    """At each checkpoint, score the weights an export would take (`exported()`, e.g. EMA applied) on
    val, then save; every rank scores the same fixed subset, so the ranks' BestVal states agree."""

    def checkpoint(step: int) -> None:
        with exported() as module:
            loss = val_loss(module)
            best.record(step, loss, module)
        tracker.log_metrics({CHECKPOINT_KEYS[0]: loss}, step)
        save(step)

    return checkpoint


def val_split(manifest: dict) -> str | None:
    """ "val" when the data has a non-empty val split, else None (then nothing is chosen on val)."""
    return "val" if manifest["splits"].get("val", {}).get("count", 0) > 0 else None


def select_weights(select: str, best: BestVal, module: nn.Module) -> str:
    """Load the best-val weights into `module` when asked and there is a val curve; says which were kept."""
    if select == "best_val" and best.best is not None:
        best.copy_to(module)
        return f"best_val (step {best.best[0]})"
    if select == "last":
        return "last"
    if best.steps:
        return f"last (no checkpoint past step {best.after_step} to choose among)"
    return "last (no val split to choose on)"
