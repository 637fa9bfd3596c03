"""Stage 1: the ViT-VQGAN tokenizer, the vanilla-VQGAN (CNN) baseline and the iGPT palette baseline."""

from vim_core.tokenizer.export import Tokenizer, load_tokenizer, save_tokenizer
from vim_core.tokenizer.model import (
    TokenizerOutput,
    UInt8Codec,
    VQTokenizer,
    build_tokenizer,
    count_params,
    to_model_range,
    to_uint8,
)
from vim_core.tokenizer.palette import PaletteTokenizer, fit_palette, fit_palette_tokenizer
from vim_core.tokenizer.quantizer import FactorizedQuantizer

__all__ = [
    "FactorizedQuantizer",
    "PaletteTokenizer",
    "Tokenizer",
    "TokenizerOutput",
    "UInt8Codec",
    "VQTokenizer",
    "build_tokenizer",
    "count_params",
    "fit_palette",
    "fit_palette_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "to_model_range",
    "to_uint8",
]
