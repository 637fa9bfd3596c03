"""Preallocated key/value buffers so that sampling feeds one token per step instead of the whole prefix."""

import torch
from torch import nn


class KVCache(nn.Module):
    """Per-layer k/v buffers of shape (batch, heads, max_len, head_dim) and the next free position."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        shape = (num_layers, batch_size, num_heads, max_len, head_dim)
        # Buffers (not parameters) so .to(device) moves them, but never saved in a state_dict.
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.max_len = max_len
        self.pos = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new (B, H, T, D) keys/values at [start, start+T); return everything up to start+T."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0
