"""Reconstruction losses: L2, logit-Laplace likelihood, and the LPIPS perceptual loss."""

import math

import torch
import torch.nn.functional as F

from vim_core.config.tokenizer import LossConfig
from vim_core.tokenizer.lpips import LPIPS
from vim_core.tokenizer.model import LAPLACE_EPS, TokenizerOutput


def l2_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(recon.float(), target.float())


def to_laplace_space(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model-range pixels -> [eps, 1 - eps]."""
    return (x.float() + 1) / 2 * (1 - 2 * LAPLACE_EPS) + LAPLACE_EPS


LOG_SCALE_FLOOR = -10.0


def floor_log_scale(log_scale: torch.Tensor, floor: float = LOG_SCALE_FLOOR) -> torch.Tensor:
    """log_scale clamped at `floor` in the forward pass, with the identity's gradient (straight-through).

    The floor keeps exp(-log_scale) finite early in training; a hard clamp would also zero the gradient
    below it, so a decoder output stuck there could never learn its way back up.
    """
    return log_scale + (log_scale.clamp(min=floor) - log_scale).detach()


def logit_laplace_nll(loc: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel negative log-likelihood of target ([-1, 1]) under a logit-Laplace(loc, exp(log_scale)).

    Density on y in (0, 1): 1 / (2 b y (1 - y)) * exp(-|logit(y) - loc| / b).
    """
    y = to_laplace_space(target)
    log_y, log_1my = torch.log(y), torch.log1p(-y)
    log_scale = floor_log_scale(log_scale.float())
    nll = (
        math.log(2)
        + log_scale
        + log_y
        + log_1my
        + (log_y - log_1my - loc.float()).abs() * torch.exp(-log_scale)
    )
    return nll.mean()


def build_perceptual_loss(cfg: LossConfig, verify_checksums: bool = True) -> LPIPS | None:
    """The LPIPS module when its weight is on (failing now if weights files are missing), else None."""
    if cfg.perceptual_weight <= 0:
        return None
    return LPIPS(cfg.weights_dir, verify_checksums=verify_checksums)


def reconstruction_losses(
    out: TokenizerOutput, target: torch.Tensor, cfg: LossConfig, perceptual: LPIPS | None = None
) -> dict[str, torch.Tensor]:
    """Weighted generator-side terms (no adversarial term), keyed by name; "total" is their sum."""
    terms = {"vq": out.vq_loss}
    if cfg.l2_weight > 0:
        terms["l2"] = cfg.l2_weight * l2_loss(out.recon, target)
    if cfg.logit_laplace_weight > 0:
        if out.laplace_loc is None or out.laplace_log_scale is None:
            raise ValueError("logit_laplace_weight > 0 needs a tokenizer built with logit_laplace=True")
        terms["logit_laplace"] = cfg.logit_laplace_weight * logit_laplace_nll(
            out.laplace_loc, out.laplace_log_scale, target
        )
    if cfg.perceptual_weight > 0:
        if perceptual is None:
            raise ValueError("perceptual_weight > 0 needs the LPIPS module from build_perceptual_loss")
        terms["perceptual"] = cfg.perceptual_weight * perceptual(out.recon, target).mean()
    terms["total"] = sum(terms.values())
    return terms
