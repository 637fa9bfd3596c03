"""The iGPT palette tokenizer on real MNIST digits, and the shared batched uint8 encode/decode."""

from pathlib import Path

import numpy as np
import pytest
import torch

import vim_core
from vim_core.config import parse_params
from vim_core.config.data import DataConfig
from vim_core.config.tokenizer import TokenizerModelConfig, ViTConfig
from vim_core.data.prepare import prepare
from vim_core.data.shards import load_split
from vim_core.errors import ConfigError, VimError
from vim_core.tokenizer.encode_dataset import tokenize_dataset
from vim_core.tokenizer.export import load_tokenizer, save_tokenizer
from vim_core.tokenizer.model import build_tokenizer, to_model_range, to_uint8
from vim_core.tokenizer.palette import PaletteTokenizer, fit_palette, fit_palette_tokenizer

MNIST = Path(vim_core.__file__).parent / "data" / "embedded" / "mnist.npz"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """200 real digits, zero-padded from 28 to 32 px, uint8 (N, 1, 32, 32)."""
    images = np.load(MNIST)["images"][:200]
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small prepared dataset in several shards, as the data stage writes it."""
    root = tmp_path_factory.mktemp("palette") / "prepared"
    prepare(DataConfig(out_dir=str(root), max_images=400, shard_size=120))
    return root


def _pixels(model: PaletteTokenizer, images: np.ndarray) -> torch.Tensor:
    """Downsampled pixel vectors (N * r * r, C), as the tokenizer sees them."""
    small = model.downsample(to_model_range(images))
    return small.permute(0, 2, 3, 1).reshape(-1, small.shape[1])


def _fitted(images: np.ndarray, clusters: int = 8, resolution: int | None = 16) -> PaletteTokenizer:
    cfg = TokenizerModelConfig(arch="palette", palette_clusters=clusters, palette_resolution=resolution)
    model = build_tokenizer(cfg, 32, 1)
    model.palette.copy_(fit_palette(_pixels(model, images), clusters, seed=0))
    return model


def test_round_trip_error_is_the_distance_to_the_nearest_colour(digits):
    model = _fitted(digits[:100])
    assert model.grid_size == (16, 16) and model.num_tokens == 256 and model.codebook_size == 8
    x = to_model_range(digits[100:])
    ids = model.encode(x)
    assert ids.shape == (100, 256) and ids.dtype == torch.long
    recon = model.decode(ids)
    assert recon.shape == x.shape

    # Brute force, independent of the tokenizer: nearest colour of each area-averaged 2x2 block.
    small = x.double().reshape(100, 1, 16, 2, 16, 2).mean(dim=(3, 5))
    d2 = (small.reshape(-1, 1) - model.palette.double().view(1, -1)) ** 2  # (pixels, clusters)
    torch.testing.assert_close(ids.flatten(), d2.argmin(1))
    up = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    nearest_d2 = d2.min(1).values.view(100, 1, 16, 16).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close((recon.double() - up) ** 2, nearest_d2, rtol=0, atol=1e-6)


def test_full_resolution_with_a_colour_per_value_is_lossless(digits):
    images = digits[:20]
    distinct = len(np.unique(images))
    model = _fitted(images, clusters=distinct, resolution=None)
    assert model.grid_size == (32, 32)
    np.testing.assert_array_equal(model.decode_uint8(model.encode_uint8(images)), images)


def test_kmeans_is_seeded_deterministic_and_a_local_optimum(digits):
    model = build_tokenizer(TokenizerModelConfig(arch="palette"), 32, 1)
    pixels = _pixels(model, digits)
    threads = torch.get_num_threads()
    try:
        a = fit_palette(pixels, 16, seed=1)
        torch.set_num_threads(1)
        b = fit_palette(pixels.numpy(), 16, seed=1)
    finally:
        torch.set_num_threads(threads)
    assert a.dtype == torch.float32 and a.shape == (16, 1)
    assert torch.equal(a, b)  # bit-identical, numpy or torch in, any thread count
    other = fit_palette(pixels, 16, seed=2)  # another seed may find another optimum; either is one
    for palette in (a, other):
        x = pixels.double()
        assign = ((x - palette.double().view(1, -1)) ** 2).argmin(1)
        counts = torch.bincount(assign, minlength=16)
        assert counts.min() > 0  # no dead colour
        means = torch.zeros(16, dtype=torch.float64).index_add_(0, assign, x[:, 0]) / counts
        assert torch.equal(means.float().view(16, 1), palette)  # re-assigning changes nothing
        assert palette.min() >= -1 and palette.max() <= 1


def test_the_kmeans_fit_counts_its_flops():
    # 3 pixels, 2 grey levels: seeding is 2 one-colour passes of 3 * (3 + 1) FLOPs plus a cumulative sum
    # and a minimum (2 * 3); each Lloyd distance pass is 3 * 2 * 4, each update 3 + 2 sums and divisions.
    stats: dict = {}
    fit_palette(torch.tensor([[-1.0], [-0.9], [1.0]]), 2, seed=0, stats=stats)
    passes = stats["lloyd_iterations"]
    assert passes == 2  # one pass and update, then a pass that changes nothing
    assert stats["flops"] == 2 * 12 + 6 + passes * 24 + (passes - 1) * 5
    big: dict = {}
    fit_palette(torch.rand(1000, 3), 8, seed=0, stats=big)
    assert big["flops"] > 1000 * 8 * 10 * big["lloyd_iterations"]


def test_more_clusters_than_distinct_pixels_repeats_colours():
    pixels = torch.tensor([[-1.0], [0.5], [1.0]]).repeat(50, 1)
    palette = fit_palette(pixels, 5, seed=0)
    assert set(palette.flatten().tolist()) == {-1.0, 0.5, 1.0}


def test_fit_on_the_train_split_and_save_load_tokenize(prepared, tmp_path):
    cfg = TokenizerModelConfig(arch="palette", palette_clusters=6, palette_fit_pixels=5000)
    model = fit_palette_tokenizer(cfg, prepared, seed=3)
    again = fit_palette_tokenizer(cfg, prepared, seed=3)
    assert torch.equal(model.palette, again.palette) and model.codebook_size == 6
    train_x, _ = load_split(prepared, "train")
    assert torch.unique(model.encode_uint8(train_x)).numel() == 6

    path = tmp_path / "palette.safetensors"
    save_tokenizer(model, cfg, str(path))
    loaded = load_tokenizer(str(path)).eval()
    assert isinstance(loaded, PaletteTokenizer) and loaded.config == cfg
    assert torch.equal(loaded.palette, model.palette)
    test_x, _ = load_split(prepared, "test")
    tokens = model.encode_uint8(test_x)
    assert torch.equal(loaded.encode_uint8(test_x), tokens)

    manifest = tokenize_dataset(str(path), prepared, tmp_path / "tokens", batch_size=7)
    assert manifest["grid"] == [16, 16] and manifest["codebook_size"] == 6
    shard_tokens, _ = load_split(tmp_path / "tokens", "test")
    np.testing.assert_array_equal(shard_tokens.astype(np.int64), tokens.numpy())


def test_fit_pixels_are_a_bounded_seeded_sample(prepared):
    from vim_core.tokenizer.palette import _sample_pixels

    model = build_tokenizer(TokenizerModelConfig(arch="palette"), 32, 1)
    train_x, _ = load_split(prepared, "train")
    everything = _pixels(model, train_x)
    assert len(_sample_pixels(model, prepared, 10**9, seed=0)) == len(everything)
    few = _sample_pixels(model, prepared, 1000, seed=0)
    assert few.shape == (1000, 1) and torch.equal(few, _sample_pixels(model, prepared, 1000, seed=0))
    assert not torch.equal(few, _sample_pixels(model, prepared, 1000, seed=1))
    assert torch.isin(few.flatten(), everything.flatten()).all()


def test_a_palette_file_of_the_wrong_shape_is_a_one_line_error(tmp_path):
    cfg = TokenizerModelConfig(arch="palette", palette_clusters=16)
    path = tmp_path / "bad.safetensors"
    save_tokenizer(PaletteTokenizer(32, 1, 16, clusters=8), cfg, str(path))
    with pytest.raises(VimError) as err:
        load_tokenizer(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert "size mismatch for palette" in str(err.value)


def test_palette_config():
    assert TokenizerModelConfig(arch="palette").grid(32) == 16
    assert TokenizerModelConfig(arch="palette", palette_resolution=None).grid(28) == 28
    assert TokenizerModelConfig().grid(32) == 8  # the ViT default is untouched
    with pytest.raises(ConfigError) as err:
        parse_params({"tokenizer": {"model": {"arch": "palette", "palette_resolution": 48}}})
    assert len(err.value.lines) == 1 and "tokenizer.model.palette_resolution 48" in err.value.lines[0]
    assert "data.image_size 32" in err.value.lines[0]
    with pytest.raises(ConfigError, match="palette_clusters"):
        parse_params({"tokenizer": {"model": {"arch": "palette", "palette_clusters": 1}}})


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


def test_palette_runs_through_the_trainers_as_the_igpt_baseline(stage2, tmp_path):
    """train_tokenizer fits (no steps), tokenize_dataset writes 16x16 grids, VIM trains on 256 tokens."""
    from tests.vim_core.transformer.test_transformer_stage import stage2_params
    from vim_core.train.tokenizer_trainer import train_tokenizer
    from vim_core.train.transformer_trainer import train_transformer

    raw = stage2_params(stage2, steps=6)
    raw["tokenizer"]["model"].update(arch="palette", palette_clusters=8, palette_resolution=16)
    raw["tokenizer"]["out_dir"] = str(tmp_path / "palette")
    raw["transformer"].update(tokens_dir=str(tmp_path / "tokens"), out_dir=str(tmp_path / "vim"))
    raw["transformer"]["checkpoint_dir"] = str(tmp_path / "ckpt")
    params = parse_params(raw)
    run = train_tokenizer(params.tokenizer, params.data.out_dir, seed=0, plots_dir=tmp_path / "plots")
    assert run.metrics["steps"] == 0 and run.metrics["train_flops"] > 0  # the k-means fit, counted
    assert "counted analytically" in run.metrics["flops_definition"]
    assert 0 < run.metrics["codebook_usage"] <= 1 and run.metrics["psnr"] > 10
    assert (tmp_path / "plots" / "tokenizer_reconstructions.png").stat().st_size > 0
    # every curve the stage declares in dvc.yaml exists, with a header and no rows (no steps were taken)
    declared = {n for n in (REPO / "dvc.yaml").read_text().split() if n.startswith("plots/tokenizer_")}
    curves = {n.removeprefix("plots/").rstrip(":") for n in declared if n.rstrip(":").endswith(".csv")}
    assert curves == {"tokenizer_loss.csv", "tokenizer_train.csv", "tokenizer_val_loss.csv"}
    for name in curves:
        lines = (tmp_path / "plots" / name).read_text().splitlines()
        assert lines[0].startswith("step") and len(lines) == 1, name
    manifest = tokenize_dataset(str(run.model_path), params.data.out_dir, tmp_path / "tokens")
    assert manifest["grid"] == [16, 16] and manifest["codebook_size"] == 8
    vim = train_transformer(params.transformer, seed=0).metrics
    assert vim["steps"] == 6 and vim["val_bits_per_token"] < 3.0  # log2(8) = 3 bits is the uniform floor
    assert vim["flops_per_step"] > 0 and vim["train_flops"] == pytest.approx(6 * vim["flops_per_step"])
