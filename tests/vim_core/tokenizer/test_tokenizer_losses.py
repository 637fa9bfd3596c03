"""Discriminator and GAN losses, logit-Laplace likelihood, and LPIPS with made-up weights files."""

import math

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from vim_core.config.tokenizer import LossConfig, TokenizerModelConfig
from vim_core.errors import VimError
from vim_core.tokenizer import build_tokenizer
from vim_core.tokenizer.discriminator import Discriminator, d_loss, g_loss, minibatch_stddev, r1_penalty
from vim_core.tokenizer.losses import (
    build_perceptual_loss,
    l2_loss,
    logit_laplace_nll,
    reconstruction_losses,
    to_laplace_space,
)
from vim_core.tokenizer.lpips import _CHANNELS, LPIPS, LPIPS_FILE, VGG16_FILE
from vim_core.tokenizer.model import laplace_mean_image


def test_discriminator_shape_and_r1():
    torch.manual_seed(0)
    disc = Discriminator(image_size=32, channels=1, width=8, max_width=32)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    assert disc(x).shape == (6,)
    penalty = r1_penalty(disc, x)
    assert penalty.ndim == 0 and penalty > 0
    penalty.backward()
    # Every weight shapes dlogit/dx, so the penalty reaches all of them (biases of the last layer cannot).
    weights = [p for name, p in disc.named_parameters() if name.endswith("weight")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


def test_minibatch_stddev_sees_diversity():
    same = torch.ones(4, 2, 4, 4)
    assert minibatch_stddev(same, 4)[:, -1].abs().max() < 1e-3  # identical samples: ~0 std
    varied = torch.randn(4, 2, 4, 4)
    out = minibatch_stddev(varied, 4)
    assert out.shape == (4, 3, 4, 4) and out[:, -1].min() > 0.1
    assert minibatch_stddev(torch.randn(6, 2, 4, 4), 4).shape == (6, 3, 4, 4)  # 6 not divisible by 4


def test_gan_losses_on_known_logits():
    zero = torch.zeros(3)
    assert float(d_loss("non_saturating", zero, zero)) == pytest.approx(2 * math.log(2), rel=1e-6)
    assert float(g_loss("non_saturating", zero)) == pytest.approx(math.log(2), rel=1e-6)
    # Confident and right: hinge D loss is 0; confident and wrong: 2 + 2.
    assert float(d_loss("hinge", torch.full((3,), 2.0), torch.full((3,), -2.0))) == 0.0
    assert float(d_loss("hinge", torch.full((3,), -1.0), torch.full((3,), 1.0))) == pytest.approx(4.0)
    assert float(g_loss("hinge", torch.tensor([1.0, 3.0]))) == pytest.approx(-2.0)
    # The generator loss falls as D rates fakes as more real, for both kinds.
    for kind in ("non_saturating", "hinge"):
        assert g_loss(kind, torch.full((2,), 1.0)) < g_loss(kind, torch.full((2,), -1.0))
    with pytest.raises(ValueError):
        d_loss("wasserstein", zero, zero)


def test_logit_laplace_nll_formula_and_minimum():
    target = torch.tensor([-1.0, -0.2, 0.5, 1.0])
    y = to_laplace_space(target)
    assert y.min() == pytest.approx(0.1) and y.max() == pytest.approx(0.9)
    best_loc = torch.log(y) - torch.log1p(-y)
    zero = torch.zeros(4)
    expected = (math.log(2) + torch.log(y) + torch.log1p(-y)).mean()
    torch.testing.assert_close(logit_laplace_nll(best_loc, zero, target), expected)
    assert logit_laplace_nll(best_loc + 0.5, zero, target) > logit_laplace_nll(best_loc, zero, target)
    # A sharper scale pays off only where the mean is right.
    assert logit_laplace_nll(best_loc, zero - 1, target) < logit_laplace_nll(best_loc, zero, target)
    torch.testing.assert_close(laplace_mean_image(best_loc), target)


def test_laplace_mean_image_clamps_forward_but_passes_the_l2_gradient():
    # sigmoid(-3) = 0.047 is below eps = 0.1, so the mean image is clamped to black; the target is grey.
    loc = torch.full((1, 1, 2, 2), -3.0, requires_grad=True)
    target = torch.zeros(1, 1, 2, 2)
    image = laplace_mean_image(loc)
    assert torch.equal(image, torch.full_like(target, -1.0))
    l2_loss(image, target).backward()
    assert (loc.grad < 0).all()  # descent raises loc toward grey; a hard clamp gave exactly 0 here
    # In range the straight-through clamp changes nothing: same value and gradient as the plain formula.
    inside = torch.linspace(-2.0, 2.0, 9, requires_grad=True)
    laplace_mean_image(inside).sum().backward()
    plain = inside.detach().clone().requires_grad_(True)
    ((torch.sigmoid(plain) - 0.1) / 0.8 * 2 - 1).sum().backward()
    torch.testing.assert_close(laplace_mean_image(inside), (torch.sigmoid(plain) - 0.1) / 0.8 * 2 - 1)
    torch.testing.assert_close(inside.grad, plain.grad)


class _Shift(torch.nn.Module):
    def __init__(self, by: float):
        super().__init__()
        self.by = by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.by


def test_saturated_logit_laplace_decoder_still_learns_from_l2():
    torch.manual_seed(0)
    model = build_tokenizer(
        TokenizerModelConfig(logit_laplace=True, codebook_size=16), image_size=16, channels=1
    )
    model.decoder = torch.nn.Sequential(model.decoder, _Shift(-10.0))  # every loc far below -2.2
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = model(x)
    assert torch.equal(out.recon, torch.full_like(x, -1.0))  # every pixel clamped
    reconstruction_losses(out, x, LossConfig(l2_weight=1.0))["l2"].backward()
    decoder_grad = sum(p.grad.abs().sum() for p in model.decoder.parameters() if p.grad is not None)
    assert decoder_grad > 0


def test_reconstruction_losses_weights_terms():
    cfg = TokenizerModelConfig(logit_laplace=True, codebook_size=16)
    model = build_tokenizer(cfg, image_size=16, channels=1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = model(x)
    terms = reconstruction_losses(out, x, LossConfig(l2_weight=2.0, logit_laplace_weight=0.1))
    assert set(terms) == {"vq", "l2", "logit_laplace", "total"}
    torch.testing.assert_close(terms["l2"], 2.0 * l2_loss(out.recon, x))
    torch.testing.assert_close(terms["total"], terms["vq"] + terms["l2"] + terms["logit_laplace"])
    with pytest.raises(ValueError, match="LPIPS"):
        reconstruction_losses(out, x, LossConfig(perceptual_weight=0.1))


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    """Random state dicts in the real files' layouts (torchvision vgg16 features, lpips v0.1 heads)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, root / VGG16_FILE)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(_CHANNELS)}
    torch.save(lins, root / LPIPS_FILE)
    return root


def test_lpips_missing_weights_fail_at_construction_naming_the_file(tmp_path, fake_weights):
    cfg = LossConfig(perceptual_weight=0.1, weights_dir=str(tmp_path))
    with pytest.raises(VimError, match=VGG16_FILE) as err:
        build_perceptual_loss(cfg)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / VGG16_FILE).write_bytes((fake_weights / VGG16_FILE).read_bytes())
    with pytest.raises(VimError, match=LPIPS_FILE):
        build_perceptual_loss(cfg, verify_checksums=False)
    assert build_perceptual_loss(LossConfig(perceptual_weight=0.0, weights_dir=str(tmp_path))) is None


def test_lpips_refuses_a_vgg_file_with_the_wrong_checksum(fake_weights):
    with pytest.raises(VimError, match="sha256"):
        LPIPS(str(fake_weights))


def test_lpips_with_made_up_weights(fake_weights):
    lpips = build_perceptual_loss(LossConfig(perceptual_weight=0.1, weights_dir=str(fake_weights)), False)
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    # Gradients reach the images (it is a loss) but never the frozen network.
    y.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips.parameters())
    rgb = torch.rand(1, 3, 32, 32)
    assert lpips(rgb, rgb.flip(-1)).item() > 0


def test_discriminator_layout_changes_speed_not_the_function():
    """NHWC activations and NCHW (the default) give the same logits and R1 gradients, to rounding."""
    x = torch.randn(8, 1, 32, 32)
    outs = []
    for channels_last in (True, False):
        torch.manual_seed(0)
        disc = Discriminator(32, 1, width=16, max_width=64, channels_last=channels_last)
        logits = disc(x)
        r1 = r1_penalty(disc, x)
        r1.backward()
        outs.append((logits.detach(), r1.detach(), disc.from_rgb.weight.grad.clone()))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_logit_laplace_scale_below_the_floor_still_gets_a_gradient():
    # The loss switched on, every log-scale output far below the floor (-10): the forward value is the
    # floor's, and descent still raises the scale (a hard clamp gave exactly 0 gradient here).
    torch.manual_seed(0)
    model = build_tokenizer(
        TokenizerModelConfig(logit_laplace=True, codebook_size=16), image_size=16, channels=1
    )
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = model(x)
    log_scale = torch.full_like(out.laplace_log_scale, -14.0, requires_grad=True)
    floored = out.laplace_log_scale.detach().clone().fill_(-10.0)
    out.laplace_log_scale = log_scale
    terms = reconstruction_losses(out, x, LossConfig(l2_weight=1.0, logit_laplace_weight=0.1))
    torch.testing.assert_close(
        terms["logit_laplace"], 0.1 * logit_laplace_nll(out.laplace_loc.detach(), floored, x)
    )
    terms["total"].backward()
    assert log_scale.grad is not None and (log_scale.grad < 0).all()
