"""Stage 1: the ViT-VQGAN tokenizer and the vanilla-VQGAN (CNN) baseline."""

from vim_core.tokenizer.model import (
    TokenizerOutput,
    VQTokenizer,
    build_tokenizer,
    count_params,
    load_tokenizer,
    save_tokenizer,
    to_model_range,
    to_uint8,
)
from vim_core.tokenizer.quantizer import FactorizedQuantizer

__all__ = [
    "FactorizedQuantizer",
    "TokenizerOutput",
    "VQTokenizer",
    "build_tokenizer",
    "count_params",
    "load_tokenizer",
    "save_tokenizer",
    "to_model_range",
    "to_uint8",
]
