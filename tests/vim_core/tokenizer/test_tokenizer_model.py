"""ViT-VQGAN and CNN tokenizers: shapes, learning on real MNIST digits, presets, save/load."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import vim_core
from vim_core.config.tokenizer import (
    PRESETS,
    CNNConfig,
    LossConfig,
    TokenizerModelConfig,
    ViTConfig,
    check_tokenizer,
    pair,
    patch_grid,
)
from vim_core.errors import VimError
from vim_core.tokenizer import (
    build_tokenizer,
    count_params,
    load_tokenizer,
    save_tokenizer,
    to_model_range,
    to_uint8,
)
from vim_core.tokenizer.vit import ViTDecoder, ViTEncoder

MNIST = Path(vim_core.__file__).parent / "data" / "embedded" / "mnist.npz"
SMALL_CNN = CNNConfig(base_channels=8, channel_mult=[1, 2, 4], res_blocks=1, z_channels=32)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """64 real digits, zero-padded from 28 to 32 px, in [-1, 1]."""
    images = np.load(MNIST)["images"][:64]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]
    return to_model_range(padded)


SMALL_VIT = ViTConfig(blocks=1, heads=2, dim=64, mlp_dim=128)


def _configs() -> list[TokenizerModelConfig]:
    return [
        TokenizerModelConfig(arch="vit", encoder=SMALL_VIT, decoder=SMALL_VIT, codebook_size=64),
        TokenizerModelConfig(arch="cnn", cnn=SMALL_CNN, codebook_size=64),
    ]


@pytest.mark.parametrize("cfg", _configs(), ids=["vit", "cnn"])
def test_encode_decode_shapes(cfg, digits):
    model = build_tokenizer(cfg, image_size=32, channels=1)
    assert model.grid_size == (8, 8) and model.num_tokens == 64 and model.codebook_size == 64
    x = digits[:4]
    ids = model.encode(x)
    assert ids.shape == (4, 64) and ids.dtype == torch.long
    assert model.decode(ids).shape == (4, 1, 32, 32)
    out = model(x)
    assert out.recon.shape == x.shape and out.indices.shape == (4, 64)
    assert out.laplace_loc is None
    torch.testing.assert_close(out.indices, ids)


@pytest.mark.parametrize("cfg", _configs(), ids=["vit", "cnn"])
def test_a_few_steps_reduce_l2(cfg, digits):
    torch.manual_seed(0)
    model = build_tokenizer(cfg, image_size=32, channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = digits[:32]
    losses = []
    for _ in range(10):
        out = model(batch)
        l2 = F.mse_loss(out.recon, batch)
        opt.zero_grad()
        (l2 + out.vq_loss).backward()
        opt.step()
        losses.append(l2.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_logit_laplace_outputs(digits):
    cfg = TokenizerModelConfig(logit_laplace=True, codebook_size=32)
    model = build_tokenizer(cfg, image_size=32, channels=1)
    out = model(digits[:2])
    assert out.laplace_loc.shape == (2, 1, 32, 32) and out.laplace_log_scale.shape == (2, 1, 32, 32)
    assert out.recon.min() >= -1 and out.recon.max() <= 1
    assert model.decode(out.indices).shape == (2, 1, 32, 32)


@pytest.mark.parametrize(("name", "paper_millions"), [("small", 32), ("base", 91), ("large", 599)])
def test_preset_sizes_match_paper_table(name, paper_millions):
    """The paper's Table 1 counts one ViT stack: Base matches to 0.3%, Small is 13-15% under, Large 7% over.

    The paper's Large (599M) is below what its own 32 blocks of width 1280 hold (630M), so its counts are
    rounded or count something slightly different; 20% tolerance keeps the check meaningful anyway.

    Counted on the meta device at the paper's 256 px with 8x8 patches, so Large allocates nothing.
    """
    cfg = PRESETS[name]
    with torch.device("meta"):
        enc = ViTEncoder(cfg, image_size=256, channels=3, patch_size=8, out_dim=cfg.dim)
        dec = ViTDecoder(cfg, image_size=256, out_channels=3, patch_size=8, in_dim=cfg.dim)
    for stack in (enc, dec):
        assert count_params(stack) / 1e6 == pytest.approx(paper_millions, rel=0.2)


def test_tiny_preset_is_cpu_sized():
    with torch.device("meta"):
        model = build_tokenizer(TokenizerModelConfig(), image_size=32, channels=1)
    assert count_params(model) < 2_000_000


def test_save_load_round_trip(tmp_path, digits):
    torch.manual_seed(0)
    cfg = TokenizerModelConfig(
        encoder=ViTConfig(blocks=1, heads=2, dim=32, mlp_dim=64),
        decoder="tiny",
        codebook_size=32,
        codebook_init="data",
        dead_code_threshold=0.1,
    )
    model = build_tokenizer(cfg, image_size=32, channels=1)
    model(digits[:8])  # data init and usage buffers now hold non-default state
    model.eval()
    path = tmp_path / "tok.safetensors"
    save_tokenizer(model, cfg, str(path))
    loaded = load_tokenizer(str(path)).eval()
    assert loaded.config == cfg
    with torch.no_grad():
        ids = model.encode(digits)
        torch.testing.assert_close(loaded.encode(digits), ids, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(ids), model.decode(ids), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_bad_tokenizer_files_raise_one_line_vim_error(tmp_path):
    cfg = TokenizerModelConfig(codebook_size=16)
    path = tmp_path / "tok.safetensors"
    save_tokenizer(build_tokenizer(cfg, 32, 1), cfg, str(path))
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "short": data[:5],
        "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64,
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(VimError) as err:
            load_tokenizer(str(bad))
        assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(VimError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.safetensors"))


def test_pixel_range_helpers_round_trip():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), torch.from_numpy(pixels))
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(TypeError):
        to_model_range(np.zeros(3, dtype=np.float32))


def test_config_checks():
    assert pair("SL") == {"encoder": "small", "decoder": "large"}
    assert patch_grid(32, 4) == 8
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_grid(30, 4)
    with pytest.raises(ValidationError, match="downsamplings"):
        TokenizerModelConfig(arch="cnn", patch_size=8)  # default CNN downsamples 4x
    with pytest.raises(ValidationError, match="unknown ViT preset"):
        TokenizerModelConfig(encoder="huge")
    with pytest.raises(ValidationError, match="divisible by heads"):
        ViTConfig(blocks=1, heads=3, dim=64, mlp_dim=64)
    with pytest.raises(ValidationError):
        TokenizerModelConfig(codebok_size=3)  # typo: unknown keys are errors
    with pytest.raises(ValueError, match="logit_laplace"):
        check_tokenizer(TokenizerModelConfig(), LossConfig(logit_laplace_weight=0.1), 32)
    cfg = TokenizerModelConfig.model_validate(
        {"encoder": {"blocks": 1, "heads": 1, "dim": 16, "mlp_dim": 16}}
    )
    assert cfg.encoder_config().dim == 16
