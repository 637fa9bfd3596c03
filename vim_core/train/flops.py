"""FLOPs counted on one real training step, and the step budget they buy.

A study compares arms at equal training FLOPs (DESIGN section 7), so every trainer counts its step with the
same counter (count_flops) and turns a `train.flops` budget into steps the same way (resolve_budget).
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from vim_core.config.training import TrainLoopConfig
from vim_core.errors import VimError
from vim_core.train import distributed as vdist


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention picks
# here; without these, attention would be free on the CPU, and a 256-token arm would look cheaper than it is.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker: its backward hooks cannot follow
    torch.autograd.grad (R1's double backward) and we only need the total."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def count_flops(fn: Callable[[], object], warmup: bool = False) -> int:
    """FLOPs of one call of fn, as torch's FlopCounterMode counts them (matmuls, convs, attention).

    fn runs for real, so callers hand it copies of their modules; the global RNG is restored afterwards so
    counting never changes what the run itself draws. With warmup, fn runs once uncounted first.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if warmup:
            fn()
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        counter.mod_tracker = _GlobalOnly()
        with counter:
            fn()
    return int(counter.get_total_flops())


@dataclass
class Budget:
    """How many steps a run takes and what they cost. `phases` are (first step, FLOPs per step) pairs,
    for trainers whose step changes cost part-way (the tokenizer's GAN start)."""

    steps: int
    phases: list[tuple[int, int]]
    requested_flops: float | None = None
    notes: dict = field(default_factory=dict)

    @property
    def train_flops(self) -> int:
        return flops_until(self.phases, self.steps)

    def metrics(self, world_size: int = 1) -> dict:
        """The budget as recorded in the metrics JSON (whole-run figures, all ranks together)."""
        out = {
            "steps": self.steps,
            "train_flops": float(self.train_flops * world_size),
            "flops_per_step": float(self.train_flops * world_size / max(self.steps, 1)),
            "flops_budget": self.requested_flops,
            "flops_counter": "torch.utils.flop_counter.FlopCounterMode on one real step, forward + backward",
        }
        if len(self.phases) > 1:
            out["flops_per_step_phases"] = [
                {"from_step": s, "flops_per_step": float(f * world_size)} for s, f in self.phases
            ]
        return out


def flops_until(phases: list[tuple[int, int]], steps: int) -> int:
    """Total FLOPs of the first `steps` steps under piecewise-constant per-step costs."""
    total = 0
    for i, (begin, per_step) in enumerate(phases):
        end = phases[i + 1][0] if i + 1 < len(phases) else steps
        total += max(0, min(end, steps) - begin) * per_step
    return total


def resolve_budget(
    t: TrainLoopConfig, section: str, phases: list[tuple[int, int]], world_size: int
) -> Budget:
    """Steps from the config, or the most steps whose FLOPs fit `t.flops` (all ranks together)."""
    if t.flops is None:
        steps = t.steps
    else:
        per_rank_budget = t.flops / world_size
        steps = 0
        for i, (begin, per_step) in enumerate(phases):
            if per_step <= 0:
                raise VimError(f"{section}.train.flops: the FLOP counter saw no work in a training step")
            end = phases[i + 1][0] if i + 1 < len(phases) else None
            spent = flops_until(phases, begin)
            fit = begin + int((per_rank_budget - spent) // per_step)
            steps = min(fit, end) if end is not None else fit
            if end is None or fit < end:
                break
        if steps < 1:
            raise VimError(
                f"{section}.train.flops = {t.flops:.3g} buys no training step "
                f"(one step costs {phases[0][1] * world_size:.3g} FLOPs)"
            )
    try:
        t.schedule.check_total(steps)
    except VimError as err:
        cause = str(err).removeprefix("lr schedule: ")
        raise VimError(f"{section}.train: {steps} steps from the budget, but {cause}") from None
    return Budget(steps, phases, t.flops)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy to run a step on for counting, so the real weights, buffers and codebook stay put."""
    return copy.deepcopy(vdist.unwrap(module))
