"""Save and load a trained VIM as one safetensors file that carries its own spec."""

import torch

from vim_core.errors import VimError
from vim_core.io import load_safetensors_with_spec, save_safetensors_with_spec
from vim_core.transformer.gpt import VIM

FORMAT = "vim-transformer/1"


def save_transformer(model: VIM, path: str, extra: dict | None = None) -> None:
    """extra (e.g. the tokenizer's sha256) travels in the spec so a mismatch can be caught on load."""
    spec = {**model.spec(), "extra": extra or {}}
    save_safetensors_with_spec(model.state_dict(), spec, FORMAT, path)


def load_transformer(path: str, map_location: str | torch.device = "cpu") -> tuple[VIM, dict]:
    """(model in eval mode, extra) from a file written by save_transformer."""
    state, spec = load_safetensors_with_spec(path, FORMAT, "transformer")
    try:
        model = VIM.from_spec(spec)
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as err:
        raise VimError(
            f"transformer file {path} does not match its spec ({str(err).splitlines()[0]})"
        ) from None
    return model.to(map_location).eval(), spec.get("extra", {})
