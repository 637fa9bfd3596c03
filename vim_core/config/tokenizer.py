"""The model and loss parts of the `tokenizer:` section: ViT presets, quantizer knobs, loss weights."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from vim_core.config.base import StrictModel


class ViTConfig(StrictModel):
    """One ViT stack (encoder or decoder)."""

    blocks: int = Field(ge=1, le=128)
    heads: int = Field(ge=1, le=128)
    dim: int = Field(ge=8, le=16384)
    mlp_dim: int = Field(ge=8, le=65536)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "ViTConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        return self


# The paper's Table 1 sizes, plus a CPU-sized `tiny` for the embedded 32 px default: with 4x4 patches
# (64 tokens) a batch-64 forward+backward takes about 0.2 s on one core; dim 128 / MLP 512 took 0.4 s.
PRESETS: dict[str, ViTConfig] = {
    "tiny": ViTConfig(blocks=2, heads=4, dim=96, mlp_dim=256),
    "small": ViTConfig(blocks=8, heads=8, dim=512, mlp_dim=2048),
    "base": ViTConfig(blocks=12, heads=12, dim=768, mlp_dim=3072),
    "large": ViTConfig(blocks=32, heads=16, dim=1280, mlp_dim=5120),
}

# Encoder/decoder pairs named as in the paper (SL = Small encoder, Large decoder).
PAIRS: dict[str, tuple[str, str]] = {
    "TT": ("tiny", "tiny"),
    "SS": ("small", "small"),
    "BB": ("base", "base"),
    "SL": ("small", "large"),
}


def pair(name: str) -> dict[str, str]:
    """`{"encoder": ..., "decoder": ...}` preset names for a paper pair such as "SL"."""
    if name not in PAIRS:
        raise ValueError(f"unknown ViT pair {name!r}; choose one of {sorted(PAIRS)}")
    encoder, decoder = PAIRS[name]
    return {"encoder": encoder, "decoder": decoder}


def resolve_vit(spec: "str | ViTConfig") -> ViTConfig:
    """A preset name or an explicit config, as a ViTConfig."""
    if isinstance(spec, ViTConfig):
        return spec
    if spec not in PRESETS:
        raise ValueError(f"unknown ViT preset {spec!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[spec]


def patch_grid(image_size: int, patch_size: int) -> int:
    """Tokens per side; raises ValueError unless patches tile the image exactly."""
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    return image_size // patch_size


class CNNConfig(StrictModel):
    """The vanilla-VQGAN baseline's conv encoder/decoder.

    Each step between `channel_mult` levels halves the resolution, so len(channel_mult) - 1 must equal
    log2(patch_size): the CNN then gives the same token grid as the ViT it is compared with.
    """

    # CPU-sized defaults (a train step costs about 1.5x the tiny ViT's); taming's VQGAN uses 128, [1,1,2,2,4],
    # 2 res blocks and 256-d codes at 256 px with 16x downsampling.
    base_channels: int = Field(default=16, ge=4, le=1024)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1, max_length=8)
    res_blocks: int = Field(default=1, ge=0, le=8)
    z_channels: int = Field(default=64, ge=4, le=4096, description="code dim: the full hidden dim")

    @model_validator(mode="after")
    def _positive_mults(self) -> "CNNConfig":
        if any(m < 1 for m in self.channel_mult):
            raise ValueError("channel_mult entries must be >= 1")
        return self


class TokenizerModelConfig(StrictModel):
    """Architecture and quantizer of a tokenizer; image_size and channels come from the data section.

    arch "palette" is the iGPT baseline: no network, pixels at palette_resolution snapped to a k-means
    colour palette fitted on the train split. It reads only the palette_* fields.
    """

    arch: Literal["vit", "cnn", "palette"] = "vit"
    encoder: str | ViTConfig = Field(default="tiny", description="preset name or explicit ViT config")
    decoder: str | ViTConfig = Field(default="tiny", description="preset name or explicit ViT config")
    patch_size: int = Field(default=4, ge=1, le=64, description="paper: 8; the CNN downsamples by it too")
    codebook_size: int = Field(default=512, ge=2, le=65536, description="paper: 8192")
    code_dim: int | None = Field(default=32, ge=1, le=4096, description="lookup dim; None: no projection")
    l2_normalize: bool = True
    beta: float = Field(default=0.25, ge=0.0, le=10.0, description="commitment weight")
    codebook_init: Literal["normal", "data"] = Field(
        default="normal", description="paper: normal; data: sample encoder outputs of the first batch"
    )
    dead_code_threshold: float = Field(
        default=0.0, ge=0.0, description="EMA hits per batch under which a code is restarted; 0: off"
    )
    dead_code_decay: float = Field(
        default=0.95, gt=0.0, lt=1.0, description="EMA decay of per-code hit counts for dead-code restarts"
    )
    codebook_lr_multiplier: float = Field(default=1.0, gt=0.0, le=1000.0)
    logit_laplace: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    cnn: CNNConfig = Field(default_factory=CNNConfig)
    # iGPT used 512 RGB clusters at 32-64 px; 16 grey levels at 16 px suit the embedded 32 px MNIST.
    palette_clusters: int = Field(default=16, ge=2, le=65536, description="palette colours (iGPT: 512)")
    palette_resolution: int | None = Field(
        default=16, ge=1, le=1024, description="side of the reduced image; None: the full image size"
    )
    palette_fit_pixels: int = Field(
        default=200_000, ge=1, le=100_000_000, description="train pixel vectors k-means sees, seeded sample"
    )

    @field_validator("encoder", "decoder")
    @classmethod
    def _known_preset(cls, spec: "str | ViTConfig") -> "str | ViTConfig":
        resolve_vit(spec)  # an unknown name fails at its own key path
        return spec

    @model_validator(mode="after")
    def _check(self) -> "TokenizerModelConfig":
        if self.arch == "cnn":
            downsamplings = len(self.cnn.channel_mult) - 1
            if 2**downsamplings != self.patch_size:
                raise ValueError(
                    f"cnn.channel_mult has {downsamplings} downsamplings (factor {2**downsamplings}) but "
                    f"patch_size is {self.patch_size}: they must match so both archs give the same grid"
                )
        return self

    def encoder_config(self) -> ViTConfig:
        return resolve_vit(self.encoder)

    def decoder_config(self) -> ViTConfig:
        return resolve_vit(self.decoder)

    def grid(self, image_size: int) -> int:
        """Tokens per side; raises ValueError when the config does not fit image_size."""
        if self.arch != "palette":
            return patch_grid(image_size, self.patch_size)
        side = self.palette_resolution or image_size
        if side > image_size:
            raise ValueError(
                f"tokenizer.model.palette_resolution {side} must not exceed data.image_size {image_size}"
            )
        return side


class DiscriminatorConfig(StrictModel):
    """StyleGAN-style discriminator width; it halves resolution down to 4x4, doubling width up to max."""

    width: int = Field(default=32, ge=4, le=1024)
    max_width: int = Field(default=256, ge=4, le=2048)
    mbstd_group: int = Field(default=4, ge=1, le=64)


class LossConfig(StrictModel):
    """Loss weights. Paper: 1.0 L2 + 0.1 logit-laplace + 0.1 LPIPS + 0.1 adversarial (+ VQ loss)."""

    l2_weight: float = Field(default=1.0, ge=0.0)
    logit_laplace_weight: float = Field(default=0.0, ge=0.0, description="paper: 0.1 (needs logit_laplace)")
    perceptual_weight: float = Field(
        default=0.0, ge=0.0, description="paper: 0.1; 0 here because VGG weights are not embedded"
    )
    adversarial_weight: float = Field(default=0.1, ge=0.0)
    adversarial_start_step: int = Field(default=0, ge=0, description="generator and D train from this step")
    gan_loss: Literal["non_saturating", "hinge"] = "non_saturating"
    r1_weight: float = Field(default=1.0, ge=0.0, description="gamma of the R1 penalty on reals")
    r1_every: int = Field(default=16, ge=1, description="lazy regularization interval (StyleGAN2)")
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    weights_dir: str = Field(default="weights", description="LPIPS/VGG weights; any fsspec URL")


def check_tokenizer(model: TokenizerModelConfig, loss: LossConfig, image_size: int) -> None:
    """Cross-section checks for the root config; raises ValueError naming the conflict."""
    model.grid(image_size)
    if loss.logit_laplace_weight > 0 and not model.logit_laplace:
        raise ValueError("loss.logit_laplace_weight > 0 needs model.logit_laplace: true")
