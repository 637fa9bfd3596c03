"""Learning-rate schedules as configs: the warmup/decay shapes of the paper and their step -> lr rule.

Step s is the 0-based index of the optimizer step the lr is used for (LambdaLR's convention when
scheduler.step() follows optimizer.step()). Warmup is linear: step s gets peak * (s + 1) / warmup_steps,
so the very first step is not wasted at lr 0 and step warmup_steps - 1 reaches the peak. Decay ends at
the last step, total_steps - 1, at exactly final_lr.

The field defaults are the paper's two schedules, written only here; PAPER_TOKENIZER_SCHEDULE and
PAPER_VIM_SCHEDULE name them. Turning a schedule into a torch scheduler is vim_core.train.schedule's job,
so this layer needs no torch.
"""

import math
from typing import Annotated, Literal

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

# The paper's schedules are the models' defaults. Copy them (model_copy) before changing a field: the
# models are mutable and these two are shared.
PAPER_TOKENIZER_SCHEDULE = CosineSchedule()
PAPER_VIM_SCHEDULE = ExponentialSchedule()
