"""ViT encoder and decoder over p x p patches (ViT-VQGAN, Yu et al. 2021, section 3.1)."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vim_core.config.tokenizer import ViTConfig, patch_grid
from vim_core.layers import MLP


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        # Tokens of an image attend to each other in both directions: no causal mask.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def tanh_head(dim: int, hidden: int, out: int) -> nn.Sequential:
    """The paper's 2-layer MLP with tanh in the middle, after the last block."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))


class _ViTStack(nn.Module):
    """Learned positions, blocks and a final LayerNorm: the part encoder and decoder share."""

    def __init__(self, cfg: ViTConfig, tokens: int, dropout: float):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, tokens, cfg.dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_dim, dropout) for _ in range(cfg.blocks)
        )
        self.ln_f = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x + self.pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def init_weights(module: nn.Module) -> None:
    """Small normal init (as in ViT/GPT-2) keeps early activations near unit scale."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _ViTStack):
            nn.init.trunc_normal_(m.pos, std=0.02)


class ViTEncoder(nn.Module):
    """Image (B, C, H, W) -> token features (B, h*w, out_dim)."""

    def __init__(
        self,
        cfg: ViTConfig,
        image_size: int,
        channels: int,
        patch_size: int,
        out_dim: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid = patch_grid(image_size, patch_size)
        # A linear map on flattened patches is the same as a stride-p conv, and reads plainer.
        self.patch_embed = nn.Linear(channels * patch_size**2, cfg.dim)
        self.stack = _ViTStack(cfg, self.grid**2, dropout)
        self.head = tanh_head(cfg.dim, cfg.mlp_dim, out_dim)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        return self.head(self.stack(self.patch_embed(patches)))


class ViTDecoder(nn.Module):
    """Token features (B, h*w, in_dim) -> image (B, out_channels, H, W), no output activation."""

    def __init__(
        self,
        cfg: ViTConfig,
        image_size: int,
        out_channels: int,
        patch_size: int,
        in_dim: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid = patch_grid(image_size, patch_size)
        # The quantizer already projects back to the encoder width; only a wider decoder (SL) needs more.
        self.embed = nn.Identity() if in_dim == cfg.dim else nn.Linear(in_dim, cfg.dim)
        self.stack = _ViTStack(cfg, self.grid**2, dropout)
        # The tanh MLP ends directly in patch pixels (out_channels per pixel).
        self.head = tanh_head(cfg.dim, cfg.mlp_dim, out_channels * patch_size**2)
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = self.head(self.stack(self.embed(z)))
        return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=self.grid, p1=p, p2=p)
