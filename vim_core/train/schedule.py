"""Learning-rate schedules of the paper, as configs and as step -> multiplier functions for LambdaLR.

Step s is the 0-based index of the optimizer step the lr is used for (LambdaLR's convention when
scheduler.step() follows optimizer.step()). Warmup is linear: step s gets peak * (s + 1) / warmup_steps,
so the very first step is not wasted at lr 0 and step warmup_steps - 1 reaches the peak. Decay ends at
the last step, total_steps - 1, at exactly final_lr.
"""

import math
from collections.abc import Callable
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from vim_core.config.base import StrictModel
from vim_core.errors import VimError


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _progress(step: int, start: int, total_steps: int) -> float:
    """0 at `start`, 1 at the last step (total_steps - 1), clamped outside."""
    span = max(1, total_steps - 1 - start)
    return min(1.0, max(0.0, (step - start) / span))


class CosineSchedule(StrictModel):
    """Linear warmup to peak_lr, then half a cosine down to final_lr at the last step (paper tokenizer)."""

    kind: Literal["cosine"] = "cosine"
    peak_lr: float = Field(1e-4, gt=0, le=1.0)
    final_lr: float = Field(5e-5, ge=0, le=1.0)
    warmup_steps: int = Field(50_000, ge=0)

    @model_validator(mode="after")
    def _final_below_peak(self):
        if self.final_lr > self.peak_lr:
            raise ValueError(f"final_lr ({self.final_lr}) must not exceed peak_lr ({self.peak_lr})")
        return self

    def check_total(self, total_steps: int) -> None:
        if self.warmup_steps >= total_steps:
            raise VimError(
                f"lr schedule: warmup_steps ({self.warmup_steps}) must be below the run's total steps "
                f"({total_steps}); shorten the warmup for short runs"
            )

    def lr_at(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * _warmup(step, self.warmup_steps)
        p = _progress(step, self.warmup_steps, total_steps)
        return self.final_lr + (self.peak_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


class ExponentialSchedule(StrictModel):
    """Linear warmup to peak_lr, flat until decay_start, then exponential decay to final_lr at the last
    step (paper VIM: 5k warmup to 4.5e-4, decay to 1e-5 from step 80k)."""

    kind: Literal["exponential"] = "exponential"
    peak_lr: float = Field(4.5e-4, gt=0, le=1.0)
    final_lr: float = Field(1e-5, gt=0, le=1.0)
    warmup_steps: int = Field(5_000, ge=0)
    decay_start: int = Field(80_000, ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.final_lr > self.peak_lr:
            raise ValueError(f"final_lr ({self.final_lr}) must not exceed peak_lr ({self.peak_lr})")
        if self.decay_start < self.warmup_steps:
            raise ValueError(
                f"decay_start ({self.decay_start}) must be >= warmup_steps ({self.warmup_steps})"
            )
        return self

    def check_total(self, total_steps: int) -> None:
        if self.decay_start >= total_steps:
            raise VimError(
                f"lr schedule: decay_start ({self.decay_start}) must be below the run's total steps "
                f"({total_steps}), or the lr never decays to final_lr"
            )

    def lr_at(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * _warmup(step, self.warmup_steps)
        if step < self.decay_start:
            return self.peak_lr
        p = _progress(step, self.decay_start, total_steps)
        return self.peak_lr * (self.final_lr / self.peak_lr) ** p


LRSchedule = Annotated[CosineSchedule | ExponentialSchedule, Field(discriminator="kind")]

PAPER_TOKENIZER_SCHEDULE = CosineSchedule(peak_lr=1e-4, final_lr=5e-5, warmup_steps=50_000)
PAPER_VIM_SCHEDULE = ExponentialSchedule(
    peak_lr=4.5e-4, final_lr=1e-5, warmup_steps=5_000, decay_start=80_000
)


def lr_multiplier(schedule: CosineSchedule | ExponentialSchedule, total_steps: int) -> Callable[[int], float]:
    """step -> lr / peak_lr, for LambdaLR on an optimizer whose lr is peak_lr.

    A plain closure (not a callable object), so LambdaLR.state_dict() stays weights_only-loadable.
    Param groups with their own lr (say, 10x for the codebook) keep their ratio to the schedule.
    """
    schedule.check_total(total_steps)
    peak = schedule.peak_lr

    def multiplier(step: int) -> float:
        return schedule.lr_at(step, total_steps) / peak

    return multiplier


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: CosineSchedule | ExponentialSchedule, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following `schedule`; build the optimizer with lr=schedule.peak_lr (or a multiple per group)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, total_steps))
