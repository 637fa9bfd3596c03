"""The `data:` section: where images come from and how they are normalised and split."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from vim_core.config.base import StrictModel


class SourceConfig(StrictModel):
    """A dataset source: the embedded MNIST, an image folder, or tar shards (local or s3://)."""

    kind: Literal["embedded_mnist", "image_folder", "tar_shards"] = "embedded_mnist"
    url: str | None = Field(default=None, description="folder or tar location; any fsspec URL")

    @model_validator(mode="after")
    def _url_matches_kind(self) -> "SourceConfig":
        if self.kind == "embedded_mnist" and self.url is not None:
            raise ValueError("url must be empty when kind is embedded_mnist")
        if self.kind != "embedded_mnist" and not self.url:
            raise ValueError(f"url is required when kind is {self.kind}")
        return self


class DataConfig(StrictModel):
    source: SourceConfig = Field(default_factory=SourceConfig)
    out_dir: str = "data/prepared"
    image_size: int = Field(default=32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    fit: Literal["resize", "center_crop", "pad"] = Field(
        default="pad", description="how images of another size reach image_size"
    )
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0, description="held out; it only scores")
    val_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="held out from train to make every choice on (sampling search, probe, classifier wd); "
        "0: no val split, and evaluation, which chooses on it, then refuses to run",
    )
    split_seed: int = Field(default=0, ge=0)
    shard_size: int = Field(default=4096, ge=1, le=1_000_000)
    max_bad_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    max_images: int | None = Field(default=None, ge=1, description="cap for quick runs; None reads all")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="processes that decode and resize images (auto: this machine's cores); the shards "
        "are byte-for-byte the same for any number",
    )
    max_classes: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="most classes a source may declare: a .cls label or a class folder beyond it is refused",
    )

    @model_validator(mode="after")
    def _room_for_train(self) -> "DataConfig":
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError(
                f"test_fraction {self.test_fraction} + val_fraction {self.val_fraction} leaves no train split"
            )
        return self
