"""Schedule configs (vim_core.config.schedule) turned into LambdaLR multipliers for a training run."""

from collections.abc import Callable

import torch

from vim_core.config.schedule import CosineSchedule, ExponentialSchedule


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
