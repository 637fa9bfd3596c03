"""StyleGAN2-style residual discriminator, the GAN losses, and the R1 penalty (the paper's L_adv)."""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

GanLoss = Literal["non_saturating", "hinge"]


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class DownBlock(nn.Module):
    """Two 3x3 convs then a 2x downsample, added to a downsampled 1x1 skip (scaled to keep variance)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(_lrelu(self.conv2(_lrelu(self.conv1(x)))), 2)
        return (h + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


def minibatch_stddev(x: torch.Tensor, group: int) -> torch.Tensor:
    """Append one channel: the feature stddev across a group of samples, so D can spot low diversity."""
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group, b) + 1) if b % d == 0)
    y = x.float().view(g, b // g, c, h, w)
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (b // g,)
    feat = std.view(1, b // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, feat.to(x.dtype)], dim=1)


class Discriminator(nn.Module):
    """Image (B, C, H, W) in [-1, 1] -> one logit per image (B,).

    Halves the resolution down to 4x4 (or until it turns odd), doubling the width each time up to max_width.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        width: int = 32,
        max_width: int = 256,
        mbstd_group: int = 4,
        channels_last: bool = False,
    ):
        super().__init__()
        self.mbstd_group = mbstd_group
        self.channels_last = channels_last
        self.from_rgb = nn.Conv2d(channels, width, 1)
        blocks, res, c = [], image_size, width
        while res > 4 and res % 2 == 0:
            c_next = min(c * 2, max_width)
            blocks.append(DownBlock(c, c_next))
            res, c = res // 2, c_next
        self.blocks = nn.Sequential(*blocks)
        self.conv = nn.Conv2d(c + 1, c, 3, padding=1)
        self.fc = nn.Linear(c * res * res, c)
        self.out = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC activations (benchmarks/discriminator_layout.py times both). `to`, not `contiguous`: a
        # 1-channel NCHW tensor already counts as channels_last-contiguous, so `contiguous` would keep
        # its strides and every layer would stay NCHW. Off by default: turning it on changes the
        # tokenizer's float rounding, so the default pipeline's recorded figures would move with it.
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        h = self.blocks(_lrelu(self.from_rgb(x)))
        h = _lrelu(self.conv(minibatch_stddev(h, self.mbstd_group)))
        return self.out(_lrelu(self.fc(h.flatten(1)))).squeeze(1)


def d_loss(kind: GanLoss, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: push real logits up and fake logits down."""
    if kind == "non_saturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def g_loss(kind: GanLoss, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator (tokenizer decoder) loss on the discriminator's logits for reconstructions."""
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "hinge":
        return -fake_logits.mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """Mean squared gradient norm of D's logits w.r.t. real images; differentiable w.r.t. D's weights.

    The caller scales it by r1_weight / 2 (and by r1_every when applied lazily, as in StyleGAN2).
    """
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
