from pathlib import Path

import numpy as np
import pytest
import torch

from vim_core.config.transformer import TransformerModelConfig
from vim_core.errors import VimError
from vim_core.eval.probe import extract_features, select_and_probe, train_linear_probe
from vim_core.transformer import VIM

MNIST = Path(__file__).resolve().parents[3] / "vim_core" / "data" / "embedded" / "mnist.npz"


@pytest.fixture(scope="module")
def mnist():
    """600 real MNIST digits in a seeded shuffle (the file is sorted by digit)."""
    d = np.load(MNIST)
    idx = np.random.default_rng(0).permutation(len(d["labels"]))[:600]
    return d["images"][idx], d["labels"][idx].astype(np.int64)


def patch_tokens(images: np.ndarray) -> np.ndarray:
    """A crude stand-in tokenizer: 4x4 patches of the 32 px padded digit, mean ink in 16 levels."""
    img = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255
    level = img.reshape(-1, 8, 4, 8, 4).mean((2, 4)).reshape(len(images), 64)
    return np.minimum((level * 16).astype(np.int64), 15)


def tiny_vim(num_classes: int = 0) -> VIM:
    torch.manual_seed(0)
    cfg = TransformerModelConfig(layers=2, heads=2, dim=64, mlp_dim=128, num_classes=num_classes)
    return VIM(cfg, 16, 8)


def test_raw_pixel_probe_beats_chance(mnist):
    x, y = mnist
    res = train_linear_probe(x[:300], y[:300], x[300:], y[300:], num_classes=10, epochs=50)
    assert res["accuracy"] > 0.6
    assert res["num_train"] == 300 and res["num_test"] == 300 and res["feature_dim"] == 784
    assert res["chance"] == 0.1


def test_probe_on_shuffled_labels_is_near_chance(mnist):
    x, y = mnist
    y_shuffled = np.random.default_rng(1).permutation(y)
    res = train_linear_probe(x[:300], y_shuffled[:300], x[300:], y[300:], num_classes=10, epochs=50)
    assert res["accuracy"] < 0.25


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_probe_is_deterministic(mnist, method):
    x, y = mnist
    kw = {"num_classes": 10, "epochs": 5, "method": method, "lr": 1.0 if method == "lbfgs" else 0.01}
    a = train_linear_probe(x[:200], y[:200], x[200:300], y[200:300], seed=3, **kw)
    b = train_linear_probe(x[:200], y[:200], x[200:300], y[200:300], seed=3, **kw)
    assert a == b


def test_random_init_vim_features_probe(mnist):
    x, y = mnist
    model = tiny_vim().train()
    feats = extract_features(model, patch_tokens(x), None, batch_size=128)
    assert feats.shape == (600, 64) and feats.dtype == torch.float32
    assert model.training  # restored
    res = train_linear_probe(feats[:300], y[:300], feats[300:], y[300:], num_classes=10)
    assert res["accuracy"] > 0.2


def test_extract_features_batches_agree_and_hide_the_label():
    model = tiny_vim(num_classes=10)
    tokens = torch.randint(0, 16, (20, 64))
    whole = extract_features(model, tokens, batch_size=20)
    torch.testing.assert_close(extract_features(model, tokens, batch_size=3), whole)
    null = torch.full((20,), model.null_class)
    torch.testing.assert_close(extract_features(model, tokens, null), whole)
    assert not torch.allclose(extract_features(model, tokens, torch.zeros(20, dtype=torch.long)), whole)
    assert not torch.allclose(extract_features(model, tokens, block=0), whole)


def test_probe_rejects_mismatched_inputs():
    with pytest.raises(VimError, match="length"):
        train_linear_probe(np.zeros((4, 3)), np.zeros(3), np.zeros((2, 3)), np.zeros(2), 2)
    with pytest.raises(VimError, match="features"):
        train_linear_probe(np.zeros((4, 3)), np.zeros(4), np.zeros((2, 5)), np.zeros(2), 2)


def test_weight_decay_is_picked_on_held_out_train_rows(mnist):
    """Pixel features of 300 digits overfit without decay; a huge decay underfits. The held-out pick
    must avoid the collapse and never look at the test split."""
    x, y = mnist
    grid = [1e-6, 1e-2, 1e3]
    res = select_and_probe(x[:300], y[:300], x[300:], y[300:], 10, grid, val_fraction=0.25, epochs=50)
    val = res["val_accuracy_by_weight_decay"]
    assert set(val) == {repr(wd) for wd in grid}
    assert val[repr(1e3)] < 0.5, "a decay of 1000 should flatten the classifier"
    assert res["weight_decay"] == max(grid, key=lambda wd: (val[repr(wd)], wd))
    assert res["weight_decay"] != 1e3 and res["accuracy"] > 0.6
    # The test labels play no part in the choice: scrambling them leaves it unchanged.
    scrambled = select_and_probe(
        x[:300], y[:300], x[300:], np.roll(y[300:], 1), 10, grid, val_fraction=0.25, epochs=50
    )
    assert scrambled["weight_decay"] == res["weight_decay"]
    assert scrambled["val_accuracy_by_weight_decay"] == val


def _block_features(x: np.ndarray) -> torch.Tensor:
    """Three 'blocks' of real digit features: noise, the pixels, and the pixels under heavy noise."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255)
    return torch.stack(
        [torch.randn(pixels.shape, generator=g), pixels, pixels + 3 * torch.randn(pixels.shape, generator=g)]
    )


def test_block_is_picked_on_held_out_train_rows_never_the_test_split(mnist):
    from vim_core.config.pipeline import ProbeConfig
    from vim_core.eval.probe import probe_blocks

    x, y = mnist
    cfg = ProbeConfig(epochs=40, weight_decays=[1e-3, 1e-1], val_fraction=0.25)
    train, test = _block_features(x[:400]), _block_features(x[400:])
    res = probe_blocks(cfg, train, y[:400], test, y[400:], 10)
    assert res["block"] == 1 and len(res["test_accuracy_by_block"]) == 3
    assert res["test_accuracy_by_block"][1] > 0.6 > res["test_accuracy_by_block"][0]
    assert res["accuracy"] == pytest.approx(res["test_accuracy_by_block"][1], abs=1e-4)
    # Test features swapped so that block 2 looks best on test: the choice does not move.
    swapped = probe_blocks(cfg, train, y[:400], test[[0, 2, 1]], y[400:], 10)
    assert swapped["test_accuracy_by_block"][2] > swapped["test_accuracy_by_block"][1]
    assert swapped["block"] == 1 and swapped["val_accuracy_by_block"] == res["val_accuracy_by_block"]
    # A fixed block (0-based) is honoured, and one past the last is a one-line error.
    assert probe_blocks(cfg.model_copy(update={"block": 2}), train, y[:400], test, y[400:], 10)["block"] == 2
    with pytest.raises(VimError, match="block 3 is out of range for 3 blocks"):
        probe_blocks(cfg.model_copy(update={"block": 3}), train, y[:400], test, y[400:], 10)


def test_with_a_val_split_it_chooses_there_and_scores_the_same_fit_on_test(mnist):
    from vim_core.config.pipeline import ProbeConfig
    from vim_core.eval.probe import probe_blocks

    x, y = mnist
    cfg = ProbeConfig(epochs=40, weight_decays=[1e-3, 1e-1])
    train, val, test = _block_features(x[:300]), _block_features(x[300:450]), _block_features(x[450:600])
    res = probe_blocks(cfg, train, y[:300], test, y[450:600], 10, val=(val, y[300:450]))
    assert res["block"] == 1 and res["selection"] == "best accuracy on the val split (not the test split)"
    # the pick's fit is scored on test as refitted on all train rows would be: same rows, same seed
    alone = train_linear_probe(
        train[1], y[:300], test[1], y[450:600], 10, epochs=40, weight_decay=res["weight_decay"]
    )
    assert res["accuracy"] == pytest.approx(alone["accuracy"])
    # test features swapped so that block 2 looks best on test: neither block nor decay moves
    swapped = probe_blocks(cfg, train, y[:300], test[[0, 2, 1]], y[450:600], 10, val=(val, y[300:450]))
    assert swapped["test_accuracy_by_block"][2] > swapped["test_accuracy_by_block"][1]
    assert (swapped["block"], swapped["weight_decay"]) == (res["block"], res["weight_decay"])
    assert swapped["val_accuracy_by_block"] == res["val_accuracy_by_block"]


def test_block_features_match_per_block_extraction(mnist):
    from vim_core.eval.probe import extract_block_features

    m = tiny_vim(num_classes=10)
    tokens = patch_tokens(mnist[0][:40])
    every = extract_block_features(m, tokens, batch_size=16)
    assert every.shape == (2, 40, 64)
    for b in range(2):
        assert torch.allclose(every[b], extract_features(m, tokens, block=b), atol=1e-6)
