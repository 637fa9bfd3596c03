"""Stage 2: the VIM decoder-only Transformer, its KV cache and sampling."""

from vim_core.transformer.gpt import MLP, VIM, Block, CausalSelfAttention
from vim_core.transformer.kv_cache import KVCache
from vim_core.transformer.sampling import (
    sample,
    sample_logits,
    select_by_score,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "MLP",
    "VIM",
    "Block",
    "CausalSelfAttention",
    "KVCache",
    "sample",
    "sample_logits",
    "select_by_score",
    "top_k_filter",
    "top_p_filter",
]
