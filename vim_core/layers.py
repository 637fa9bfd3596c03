"""Layers the ViT tokenizer and the VIM Transformer share."""

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """The Transformer feed-forward: Linear, GELU, Linear, dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))
