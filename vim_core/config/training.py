"""Knobs every trainer shares: steps, batch, optimizer, schedule, precision, checkpoints."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from vim_core.config.base import StrictModel
from vim_core.config.schedule import CosineSchedule, LRSchedule


class TrainLoopConfig(StrictModel):
    steps: int | None = Field(default=1000, ge=1, description="null when the run is budgeted in flops")
    flops: float | None = Field(
        default=None,
        gt=0,
        description="training budget in FLOPs (all ranks), instead of steps: steps = budget / the FLOPs "
        "of one real step, counted at start-up (torch FlopCounterMode)",
    )
    batch_size: int = Field(default=64, ge=1, description="global batch; split across DDP ranks")
    schedule: LRSchedule = Field(default_factory=CosineSchedule)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(default=1e-4, ge=0.0, description="decoupled (AdamW)")
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0, description="None: no EMA weights")
    bf16: bool | Literal["auto"] = Field(
        default=False,
        description="bf16 autocast: true, false, or auto (on only where bf16 matmuls are native: a CUDA GPU "
        "with bf16, or a CPU with AVX-512 BF16 or AMX; elsewhere bf16 is emulated and many times slower)",
    )
    compile: bool = Field(default=False, description="torch.compile the model; for GPUs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=1,
        description="training processes on this machine, launched by the stage itself (torch's elastic "
        "launcher): 1, N, or auto (one per visible GPU; 1 without CUDA). Several machines: docs/scaling.md",
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None: torch's default")
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    resume: Literal["auto", "never"] = "auto"
    select: Literal["best_val", "last"] = Field(
        default="best_val",
        description="which weights to export: those with the lowest val loss among the checkpoints "
        "(a small dataset overfits long before the last step; the tokenizer chooses among those trained under "
        "its GAN), or the last step's",
    )
    val_examples: int = Field(
        default=256,
        ge=1,
        description="first N val examples scored at every checkpoint (fixed, deterministic)",
    )
    log_every: int = Field(default=10, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _budget_replaces_default_steps(cls, data):
        if isinstance(data, dict) and data.get("flops") is not None and "steps" not in data:
            return {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def _schedule_fits(self) -> "TrainLoopConfig":
        if self.flops is not None and self.steps is not None:
            raise ValueError("set steps or flops, not both (set steps: null to train on a FLOP budget)")
        if self.flops is None and self.steps is None:
            raise ValueError("set steps or flops: the run needs a length")
        if self.steps is not None:
            try:
                self.schedule.check_total(self.steps)
            except Exception as err:
                raise ValueError(str(err).removeprefix("lr schedule: ")) from None
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas {self.betas} must lie in [0, 1)")
        return self


class TransformerTrainConfig(TrainLoopConfig):
    """The shared loop plus VIM's one training-only knob, label dropout, which presets do not carry."""

    cfg_dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="probability of training on the null class instead of the label, so classifier-free "
        "guidance can be used (paper: 0, no label dropout)",
    )
