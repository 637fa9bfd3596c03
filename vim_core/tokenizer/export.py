"""Save and load a trained tokenizer (any arch) as one safetensors file that carries its own config."""

import torch
from pydantic import ValidationError

from vim_core.config.tokenizer import TokenizerModelConfig
from vim_core.errors import VimError
from vim_core.io import load_safetensors_with_spec, save_safetensors_with_spec
from vim_core.tokenizer.model import VQTokenizer, build_tokenizer
from vim_core.tokenizer.palette import PaletteTokenizer

FORMAT = "vim-tokenizer/1"

# What load_tokenizer returns; consumers need only encode/decode(_uint8), codebook_size and grid_size.
Tokenizer = VQTokenizer | PaletteTokenizer


def save_tokenizer(model: Tokenizer, cfg: TokenizerModelConfig, path: str) -> None:
    """Weights (or the palette) as safetensors, with the config in the metadata so load can rebuild it."""
    spec = {"model": cfg.model_dump(mode="json"), "image_size": model.image_size, "channels": model.channels}
    save_safetensors_with_spec(model.state_dict(), spec, FORMAT, path)


def load_tokenizer(path: str, map_location: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a tokenizer saved by save_tokenizer; a bad file raises a one-line VimError."""
    state, spec = load_safetensors_with_spec(path, FORMAT, "tokenizer")
    try:
        cfg = TokenizerModelConfig.model_validate(spec["model"])
        model = build_tokenizer(cfg, int(spec["image_size"]), int(spec["channels"]))
    except (KeyError, ValueError, TypeError, ValidationError) as err:
        raise VimError(f"tokenizer file {path} has an unusable config: {str(err).splitlines()[0]}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # shape mismatch: the file does not fit its own config
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # lines[0] only says "Error(s) in loading ..."
        raise VimError(f"cannot load weights from {path}: {detail}") from None
    return model.to(map_location)
