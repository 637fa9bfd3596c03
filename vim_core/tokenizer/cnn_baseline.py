"""The vanilla-VQGAN baseline's conv encoder and decoder (Esser et al. 2021), at small scale.

They speak the same token interface as the ViT ones: the encoder returns (B, h*w, z_channels) and the
decoder takes it back, so one tokenizer class serves both architectures.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vim_core.config.tokenizer import CNNConfig


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class CNNEncoder(nn.Module):
    """Image (B, C, H, W) -> (B, h*w, z_channels), downsampling 2x between channel_mult levels."""

    def __init__(self, cfg: CNNConfig, channels: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        c = widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(c, w))
                c = w
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [ResBlock(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, cfg.z_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.net(x), "b c h w -> b (h w) c")


class CNNDecoder(nn.Module):
    """(B, h*w, z_channels) -> image (B, out_channels, H, W), mirroring the encoder; no output activation."""

    def __init__(self, cfg: CNNConfig, out_channels: int, grid: int):
        super().__init__()
        self.grid = grid
        widths = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]
        c = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.z_channels, c, 3, padding=1), ResBlock(c, c)]
        for level, w in enumerate(widths):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(c, w))
                c = w
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(rearrange(z, "b (h w) c -> b c h w", h=self.grid))
