"""The batched uint8 encode/decode every tokenizer shares, against the loops it replaced."""

from pathlib import Path

import numpy as np
import pytest
import torch

import vim_core
from vim_core.config.tokenizer import TokenizerModelConfig, ViTConfig
from vim_core.tokenizer.model import build_tokenizer, to_model_range, to_uint8

MNIST = Path(vim_core.__file__).parent / "data" / "embedded" / "mnist.npz"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """200 real digits, zero-padded from 28 to 32 px, uint8 (N, 1, 32, 32)."""
    images = np.load(MNIST)["images"][:200]
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_uint8_codec_equals_the_per_batch_loop(arch, digits):
    """encode_uint8/decode_uint8 give what the old hand-written loops gave, bit for bit."""
    torch.manual_seed(0)
    vit = ViTConfig(blocks=1, heads=2, dim=32, mlp_dim=64)
    cfg = TokenizerModelConfig(arch=arch, encoder=vit, decoder=vit, codebook_size=64)
    model = build_tokenizer(cfg, 32, 1).eval()
    images, batch = digits[:50], 16
    with torch.inference_mode():
        tokens = torch.cat([model.encode(to_model_range(images[i : i + batch])) for i in range(0, 50, batch)])
        recon = np.concatenate(
            [to_uint8(model.decode(tokens[i : i + batch])).numpy() for i in range(0, 50, batch)]
        )
    assert torch.equal(model.encode_uint8(images, batch), tokens)
    assert torch.equal(model.encode_uint8(torch.from_numpy(images), batch), tokens)
    np.testing.assert_array_equal(model.decode_uint8(tokens, batch), recon)
    np.testing.assert_array_equal(model.decode_uint8(tokens.numpy().astype(np.uint16), batch), recon)
    assert model.encode_uint8(images[:0]).shape == (0, 64)
    assert model.decode_uint8(tokens[:0]).shape == (0, 1, 32, 32)
