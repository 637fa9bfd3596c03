"""The per-stage sections of params.yaml, composed from the model, loss and loop configs."""

from pydantic import Field, field_validator, model_validator

from vim_core.config.base import StrictModel
from vim_core.config.schedule import (
    PAPER_TOKENIZER_SCHEDULE,
    PAPER_VIM_SCHEDULE,
    ExponentialSchedule,
    LRSchedule,
)
from vim_core.config.tokenizer import LossConfig, TokenizerModelConfig
from vim_core.config.training import TrainLoopConfig, TransformerTrainConfig
from vim_core.config.transformer import (
    SamplingConfig,
    TransformerArchConfig,
    TransformerModelConfig,
    resolve_arch,
    resolve_model,
)


def _tokenizer_loop() -> TrainLoopConfig:
    # Paper: Adam(0.9, 0.99), wd 1e-4, 500k steps at batch 256, the paper's tokenizer lr schedule.
    return TrainLoopConfig(
        steps=500_000,
        batch_size=256,
        betas=(0.9, 0.99),
        weight_decay=1e-4,
        schedule=PAPER_TOKENIZER_SCHEDULE.model_copy(),
    )


class TokenizerEvalConfig(StrictModel):
    usage_batch_size: int = Field(default=256, ge=1, description="paper: usage per batch of 256 test images")
    max_test_images: int | None = Field(default=None, ge=1, description="None: the whole test split")
    grid_images: int = Field(default=32, ge=1, le=256)


class TokenizerSection(StrictModel):
    """`tokenizer:` — the ViT-VQGAN (or the CNN baseline) and how it is trained."""

    model: TokenizerModelConfig = Field(default_factory=TokenizerModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainLoopConfig = Field(default_factory=_tokenizer_loop)
    eval: TokenizerEvalConfig = Field(default_factory=TokenizerEvalConfig)
    out_dir: str = "models/tokenizer"
    checkpoint_dir: str = "checkpoints/tokenizer"


def _transformer_loop() -> TransformerTrainConfig:
    # Paper: Adam(0.9, 0.96), batch 1024, 450k steps, the paper's VIM lr schedule, no label dropout.
    return TransformerTrainConfig(
        steps=450_000,
        batch_size=1024,
        betas=(0.9, 0.96),
        weight_decay=0.01,
        schedule=PAPER_VIM_SCHEDULE.model_copy(),
    )


class ProbeConfig(StrictModel):
    """Linear probe on average-pooled features of one block (paper: VIM-B block 10 of 24, VIM-L 15 of 36)."""

    block: int | None = Field(
        default=None,
        ge=0,
        description="0-based (0 is the first block); None: the block with the best accuracy on the held-out "
        "train rows (never the test split). Every block is probed either way, for the curve over depth.",
    )
    epochs: int = Field(default=100, ge=1, description="L-BFGS iterations")
    weight_decays: list[float] = Field(
        default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2],
        min_length=1,
        description="grid; each feature set takes the value best on a held-out part of the train split",
    )
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="train rows held out to pick it")

    @model_validator(mode="after")
    def _non_negative(self) -> "ProbeConfig":
        if any(wd < 0 for wd in self.weight_decays):
            raise ValueError(f"weight_decays {self.weight_decays} must all be >= 0")
        return self


class UncondFinetuneConfig(StrictModel):
    """An unconditional VIM made from the class-conditional one: a copy whose start vector is the null
    class's embedding, trained on the null class alone (no labels) for a few hundred steps.

    A class-conditional VIM sees its null class only cfg_dropout of the time, so its unconditional samples
    lag far behind (FID_domain 18x the real floor on the default); a second VIM trained from scratch costs
    its full training again. The copy starts from everything the class-conditional VIM learned about
    tokens. Not in the paper, which trains an unconditional model of its own. Every other training knob
    (batch, optimizer, bf16, processes, checkpoint interval, best-val selection) is transformer.train's.
    """

    steps: int = Field(ge=1, le=10_000_000)
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0, description="None: the VIM's own")
    schedule: LRSchedule = Field(
        default_factory=lambda: ExponentialSchedule(
            peak_lr=1e-3, final_lr=1e-4, warmup_steps=30, decay_start=30
        )
    )

    @model_validator(mode="after")
    def _schedule_fits(self) -> "UncondFinetuneConfig":
        try:
            self.schedule.check_total(self.steps)
        except Exception as err:
            raise ValueError(str(err).removeprefix("lr schedule: ")) from None
        return self


class TransformerSection(StrictModel):
    """`transformer:` — the VIM model, how it is trained, sampled and probed (rejection: see `evaluate:`)."""

    model: str | TransformerArchConfig = Field(
        default="tiny", description="preset name or explicit architecture"
    )
    train: TransformerTrainConfig = Field(default_factory=_transformer_loop)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    uncond: UncondFinetuneConfig | None = Field(
        default=None,
        description="None: a class-conditional VIM's null class draws the unconditional samples",
    )
    tokens_dir: str = "data/tokens"
    out_dir: str = "models/transformer"
    checkpoint_dir: str = "checkpoints/transformer"

    @field_validator("model")
    @classmethod
    def _known_preset(cls, value: "str | TransformerArchConfig") -> "str | TransformerArchConfig":
        resolve_arch(value)  # an unknown name fails here, at transformer.model, not at the root
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _architecture_only(cls, value: object) -> object:
        # A full model config here would carry a second cfg_dropout beside train's; say where it goes.
        if isinstance(value, TransformerModelConfig) or (isinstance(value, dict) and "cfg_dropout" in value):
            raise ValueError("cfg_dropout is a training choice: set it as transformer.train.cfg_dropout")
        return value

    def resolved_model(self) -> TransformerModelConfig:
        """The model to build: the preset or explicit architecture, with train.cfg_dropout."""
        return resolve_model(self.model).model_copy(update={"cfg_dropout": self.train.cfg_dropout})

    def uncond_section(self) -> "TransformerSection | None":
        """The section that trains the unconditional copy (see UncondFinetuneConfig), in out_dir/uncond and
        checkpoint_dir/uncond; None when `uncond` is off or the VIM is unconditional already."""
        arch = resolve_arch(self.model)
        if self.uncond is None or arch.num_classes == 0:
            return None
        dropout = {} if self.uncond.dropout is None else {"dropout": self.uncond.dropout}
        train = self.train.model_copy(
            update={
                "steps": self.uncond.steps,
                "flops": None,
                "schedule": self.uncond.schedule,
                "cfg_dropout": 0.0,
            }
        )
        return self.model_copy(
            update={
                "model": arch.model_copy(update={"num_classes": 0, **dropout}),
                "train": train,
                "uncond": None,
                "out_dir": f"{self.out_dir}/uncond",
                "checkpoint_dir": f"{self.checkpoint_dir}/uncond",
            }
        )


class ClassifierConfig(StrictModel):
    """The two domain classifiers of the train_classifier stage, both trained on the train split.

    The first defines FID/KID features, IS logits and class accuracy; the scorer, another seed and a wider
    net, ranks rejection-sampling candidates, so rejection is not graded by the network that scores it.
    Neither reads the top-level `seed`: every run and study arm on the same data reuses them.
    """

    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=4e-3, gt=0.0, description="peak of a one-cycle schedule")
    weight_decays: list[float] = Field(
        default_factory=lambda: [0.0, 0.05, 0.2],
        min_length=1,
        description="grid; the value with the best val-split accuracy trains both classifiers",
    )
    seed: int = Field(default=0, ge=0)
    width: int = Field(default=32, ge=4, le=256, description="first conv stage's channels")
    scorer_seed: int = Field(default=1, ge=0, description="must differ from seed")
    scorer_width: int = Field(default=48, ge=4, le=256, description="must differ from width")

    @model_validator(mode="after")
    def _independent_scorer(self) -> "ClassifierConfig":
        if any(wd < 0 for wd in self.weight_decays):
            raise ValueError(f"weight_decays {self.weight_decays} must all be >= 0")
        if self.scorer_seed == self.seed or self.scorer_width == self.width:
            raise ValueError("the rejection scorer needs its own scorer_seed and scorer_width")
        return self


class SamplingSearchConfig(StrictModel):
    """Guidance scale, temperature, top-k and top-p picked by FID_domain against the val split, never test.

    Conditional samples: each scale at plain sampling, then temperatures x top_ks x top_ps at the scale
    picked. Unconditional samples: temperatures x top_ks x top_ps, no guidance.
    """

    cfg_scales: list[float] = Field(
        default_factory=lambda: [1.5, 2.0, 3.0],
        min_length=1,
        description="candidates for a class-conditional VIM; an unconditional one samples at 1.0",
    )
    temperatures: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    top_ks: list[int | None] = Field(
        default_factory=lambda: [None], min_length=1, description="null: no top-k truncation"
    )
    top_ps: list[float | None] = Field(
        default_factory=lambda: [None], min_length=1, description="null: no nucleus truncation"
    )
    samples: int = Field(default=500, ge=10, description="balanced images drawn per candidate")
    reference_images: int = Field(
        default=1000, ge=10, description="val-split images scored against (at most the whole val split)"
    )
    min_class_accuracy: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="a candidate whose own draws the classifier assigns to the requested class less often "
        "is not picked (if none qualifies, the most accurate is); None: FID alone decides",
    )

    @model_validator(mode="after")
    def _in_range(self) -> "SamplingSearchConfig":
        if any(s < 0 or s > 100 for s in self.cfg_scales):
            raise ValueError(f"cfg_scales {self.cfg_scales} must lie in [0, 100]")
        if any(t <= 0 or t > 100 for t in self.temperatures):
            raise ValueError(f"temperatures {self.temperatures} must lie in (0, 100]")
        if any(k is not None and k < 1 for k in self.top_ks):
            raise ValueError(f"top_ks {self.top_ks} must be null or >= 1")
        if any(p is not None and not 0 < p <= 1 for p in self.top_ps):
            raise ValueError(f"top_ps {self.top_ps} must be null or lie in (0, 1]")
        return self


class EvaluateSection(StrictModel):
    """`evaluate:` — generation, reconstruction and probe metrics, each with its definition."""

    num_samples: int = Field(
        default=1000, ge=10, description="generated images scored, balanced over classes"
    )
    cfg_scale: float | None = Field(default=None, ge=0.0, description="None: transformer.sampling.cfg_scale")
    sampling_search: SamplingSearchConfig | None = Field(
        default=None,
        description="None: sample at cfg_scale and transformer.sampling's temperature, top_k, top_p; else "
        "the candidates with the lowest FID_domain against the val split set them for the test metrics",
    )
    acceptance_rate: float = Field(default=0.5, gt=0.0, le=1.0, description="rejection sampling (paper: 0.5)")
    kid_subset_size: int = Field(default=500, ge=2)
    seed: int = Field(
        default=0,
        ge=0,
        description="offset added to the top-level seed: the run's seed draws the samples and the probe "
        "subset, so seeds spread evaluation noise too",
    )
    probes: bool = Field(default=True, description="false: skip the linear probes (generation studies)")
    sampling: bool = Field(
        default=True,
        description="false: skip every sampling metric (FID/KID/IS of samples, class accuracy, rejection, "
        "the search); representation studies",
    )
    weights_dir: str = Field(default="weights", description="InceptionV3 weights for the Inception metrics")
    max_probe_train: int | None = Field(default=5000, ge=10, description="None: the whole train split")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    classifier_dir: str = "models/classifier"


class PromotionConfig(StrictModel):
    """How a challenger pipeline run is compared with the champion on the same evaluation.

    Promotion is a choice, so its metrics are validation-split ones (eval.json's *_val keys).
    """

    metric: str = "fid_domain_val"
    lower_is_better: bool = True
    guard_metric: str | None = "class_accuracy_val"
    guard_min: float = 0.9


class ScheduleConfig(StrictModel):
    """`schedule:` — when the retraining deployment (flows/deploy.py) runs the pipeline."""

    cron: str = Field(default="0 3 * * 1", description="5-field cron expression (default: Mondays 03:00)")
    timezone: str = Field(default="UTC", description="IANA time zone the cron is read in")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r} (e.g. UTC, Europe/Paris)") from None
        return value

    @model_validator(mode="after")
    def _five_fields(self) -> "ScheduleConfig":
        if len(self.cron.split()) != 5:
            raise ValueError(f"cron {self.cron!r} must have 5 fields: minute hour day month weekday")
        return self
