"""The model and sampling parts of the `transformer:` section (VIM presets, sampling knobs), and how
rejection sampling selects (evaluate.acceptance_rate sets its rate)."""

from typing import Literal

from pydantic import Field, model_validator

from vim_core.config.base import StrictModel


class TransformerArchConfig(StrictModel):
    """A VIM decoder's shape, what a preset names; codebook size and token grid come from the tokenizer."""

    layers: int = Field(ge=1, le=256)
    heads: int = Field(ge=1, le=256)
    dim: int = Field(ge=8, le=32768)
    mlp_dim: int = Field(ge=8, le=131072)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="paper: 0.1")
    num_classes: int = Field(default=0, ge=0, le=1_000_000, description="0: unconditional")
    pos_embedding: Literal["2d", "full"] = Field(
        default="2d", description="2d: row + column tables; full: one learned vector per position"
    )

    @model_validator(mode="after")
    def _check(self) -> "TransformerArchConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        return self


class TransformerModelConfig(TransformerArchConfig):
    """What a VIM is built from and what its file stores: the architecture plus the label dropout that
    its forward pass applies in training.

    Label dropout is a training choice, so params.yaml sets it as transformer.train.cfg_dropout and
    TransformerSection.resolved_model() copies it here; presets carry architecture only.
    """

    cfg_dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="training probability of swapping the class for the null class, so CFG can be used "
        "(paper: 0, no label dropout)",
    )


# The paper's VIM sizes (class-conditional ImageNet) and a CPU-sized `tiny` for the embedded MNIST default.
# tiny drops dropout: a few minutes of training is far from overfitting 9k images, and dropout slows it.
PRESETS: dict[str, TransformerArchConfig] = {
    "tiny": TransformerArchConfig(layers=4, heads=4, dim=192, mlp_dim=768, dropout=0.0, num_classes=10),
    "vim-base": TransformerArchConfig(layers=24, heads=16, dim=1536, mlp_dim=6144, num_classes=1000),
    "vim-large": TransformerArchConfig(layers=36, heads=32, dim=2048, mlp_dim=8192, num_classes=1000),
}


def resolve_arch(spec: "str | TransformerArchConfig") -> TransformerArchConfig:
    """A preset name or an explicit architecture, as a TransformerArchConfig."""
    if isinstance(spec, TransformerArchConfig):
        return spec
    if spec not in PRESETS:
        raise ValueError(f"unknown VIM preset {spec!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[spec].model_copy()


def resolve_model(spec: "str | TransformerArchConfig") -> TransformerModelConfig:
    """A preset name, an architecture or a model config, as a TransformerModelConfig.

    A full model config passes through; an architecture gets no label dropout (the model config's
    default). The pipeline builds its model through TransformerSection.resolved_model() instead, which
    adds transformer.train.cfg_dropout.
    """
    if isinstance(spec, TransformerModelConfig):
        return spec
    return TransformerModelConfig(**resolve_arch(spec).model_dump())


class SamplingConfig(StrictModel):
    """How tokens are drawn; the paper samples at temperature 1.0 with no top-k/top-p."""

    temperature: float = Field(default=1.0, ge=0.0, le=100.0, description="0: greedy")
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    cfg_scale: float = Field(default=1.0, ge=0.0, le=100.0, description="1.0: classifier-free guidance off")
    batch_size: int = Field(default=64, ge=1, le=65536)
    seed: int = Field(default=0, ge=0)


class RejectionConfig(StrictModel):
    """Classifier-based rejection: keep samples whose requested-class probability clears a bar."""

    mode: Literal["threshold", "acceptance_rate"] = "acceptance_rate"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="mode threshold: minimum probability")
    acceptance_rate: float = Field(
        default=0.5, gt=0.0, le=1.0, description="mode acceptance_rate: fraction kept (paper: 0.5)"
    )
