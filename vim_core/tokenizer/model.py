"""One tokenizer interface for ViT-VQGAN and the CNN baseline, plus pixel-range helpers.

A trainer only sees `VQTokenizer`: encode(x) -> token ids, decode(ids) -> image, forward(x) -> TokenizerOutput.
Consumers of a trained tokenizer use encode_uint8/decode_uint8 from `UInt8Codec`, which the palette tokenizer
shares. Save/load live in export.py.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vim_core.config.tokenizer import TokenizerModelConfig
from vim_core.tokenizer.cnn_baseline import CNNDecoder, CNNEncoder
from vim_core.tokenizer.pixels import UInt8Codec, to_model_range, to_uint8  # noqa: F401  (re-exported)
from vim_core.tokenizer.quantizer import FactorizedQuantizer
from vim_core.tokenizer.vit import ViTDecoder, ViTEncoder

if TYPE_CHECKING:
    from vim_core.tokenizer.palette import PaletteTokenizer

# Pixels are squeezed from [0, 1] into [eps, 1 - eps] before the logit, as in DALL-E, so the logit
# (and so the likelihood) stays finite at pure black and white.
LAPLACE_EPS = 0.1


def laplace_mean_image(loc: torch.Tensor) -> torch.Tensor:
    """The image a logit-Laplace decoder means: sigmoid(loc), un-squeezed and mapped back to [-1, 1].

    Images fill only [eps, 1 - eps] of sigmoid's range, so the un-squeezed mean leaves [0, 1] wherever
    |loc| > logit(1 - eps) = 2.2, and is clamped there: the image that is shown, scored and fed to the
    discriminator stays in pixel range. A plain clamp has derivative 0 outside [0, 1], which would cut
    the L2, LPIPS and GAN gradients off from every overshooting pixel, leaving only the 0.1-weighted
    likelihood to pull it back. So the clamp is straight-through: the forward value is exactly the
    clamped one, the backward pass is the identity. That never moves the clamped image the wrong way
    (a loss of the clamped value changes monotonically with the unclamped one); at worst it pushes a
    saturated pixel further out, where sigmoid's own slope fades.
    """
    x01 = (torch.sigmoid(loc) - LAPLACE_EPS) / (1 - 2 * LAPLACE_EPS)
    x01 = x01.clamp(0, 1).detach() + (x01 - x01.detach())  # exactly the clamp forward; identity backward
    return x01 * 2 - 1


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # (B, C, H, W), model range [-1, 1] (approximately: no output clamp)
    indices: torch.Tensor  # (B, h*w) long, raster order
    vq_loss: torch.Tensor
    stats: dict[str, torch.Tensor]  # batch "usage" fraction and "perplexity", at least
    laplace_loc: torch.Tensor | None = None  # logit-space mean, only with logit_laplace
    laplace_log_scale: torch.Tensor | None = None


class VQTokenizer(UInt8Codec, nn.Module):
    """encoder (image -> (B, N, dim)) + quantizer + decoder ((B, N, dim) -> image)."""

    def __init__(
        self,
        encoder: nn.Module,
        quantizer: FactorizedQuantizer,
        decoder: nn.Module,
        image_size: int,
        channels: int,
        grid: int,
        logit_laplace: bool = False,
        config: TokenizerModelConfig | None = None,
    ):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.image_size, self.channels = image_size, channels
        self.grid_size = (grid, grid)
        self.logit_laplace = logit_laplace
        self.config = config

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def _decode_features(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        raw = self.decoder(z)
        if not self.logit_laplace:
            return raw, None, None
        loc, log_scale = raw.split(self.channels, dim=1)
        return laplace_mean_image(loc), loc, log_scale

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        quantized, indices, vq_loss, stats = self.quantizer(self.encoder(x))
        recon, loc, log_scale = self._decode_features(quantized)
        return TokenizerOutput(recon, indices, vq_loss, stats, loc, log_scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> token ids (B, h*w) long.

        Tokenize in eval mode: in train mode the quantizer may still initialise or restart codes.
        """
        _, indices, _, _ = self.quantizer(self.encoder(x))
        return indices

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h*w) -> images (B, C, H, W) in about [-1, 1]."""
        return self._decode_features(self.quantizer.lookup(indices.long()))[0]

    def codebook_parameters(self) -> list[nn.Parameter]:
        return self.quantizer.codebook_parameters()


def build_tokenizer(
    cfg: TokenizerModelConfig, image_size: int, channels: int
) -> "VQTokenizer | PaletteTokenizer":
    """The tokenizer cfg describes, for images of image_size x image_size with `channels` channels.

    A palette tokenizer comes back unfitted (all-zero palette): fit_palette_tokenizer or a load fills it.
    """
    grid = cfg.grid(image_size)
    if cfg.arch == "palette":
        from vim_core.tokenizer.palette import PaletteTokenizer  # palette.py never imports this module

        return PaletteTokenizer(image_size, channels, grid, cfg.palette_clusters, cfg)
    out_channels = channels * (2 if cfg.logit_laplace else 1)  # mean and log-scale per pixel
    quant = dict(
        codebook_size=cfg.codebook_size,
        beta=cfg.beta,
        init=cfg.codebook_init,
        dead_code_threshold=cfg.dead_code_threshold,
        usage_decay=cfg.dead_code_decay,
    )
    if cfg.arch == "vit":
        enc_cfg, dec_cfg = cfg.encoder_config(), cfg.decoder_config()
        encoder = ViTEncoder(enc_cfg, image_size, channels, cfg.patch_size, enc_cfg.dim, cfg.dropout)
        quantizer = FactorizedQuantizer(
            enc_cfg.dim, code_dim=cfg.code_dim, l2_normalize=cfg.l2_normalize, **quant
        )
        decoder = ViTDecoder(dec_cfg, image_size, out_channels, cfg.patch_size, enc_cfg.dim, cfg.dropout)
    else:
        # Vanilla VQGAN: codes live in the full hidden dim, unnormalized.
        encoder = CNNEncoder(cfg.cnn, channels)
        quantizer = FactorizedQuantizer(cfg.cnn.z_channels, code_dim=None, l2_normalize=False, **quant)
        decoder = CNNDecoder(cfg.cnn, out_channels, grid)
    return VQTokenizer(encoder, quantizer, decoder, image_size, channels, grid, cfg.logit_laplace, cfg)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
