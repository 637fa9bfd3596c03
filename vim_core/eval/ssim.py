"""SSIM (Wang et al. 2004) for uint8 images: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 255.

Neither torchmetrics nor scikit-image is installed, so this is the reference recipe: statistics over
"valid" window positions only (as the authors' MATLAB code), per channel, averaged over pixels and channels.
"""

import numpy as np
import torch
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_per_image(
    x, y, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """SSIM of each image pair (N,), float64, for uint8 images (N, C, H, W) of equal shape."""
    x, y = (t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in (x, y))
    if x.dtype != torch.uint8 or y.dtype != torch.uint8 or x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim needs two uint8 (N, C, H, W) of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim needs images of at least {window}x{window} pixels, got {tuple(x.shape[-2:])}")
    n, c = x.shape[:2]
    x, y = x.double(), y.double()
    w = _gaussian_window(window, sigma).expand(c, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)  # depthwise, no padding: valid positions only

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * 255) ** 2, (k2 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.reshape(n, -1).mean(1)


def ssim(x, y, **kwargs) -> float:
    """Mean SSIM over image pairs of uint8 (N, C, H, W) batches."""
    return float(ssim_per_image(x, y, **kwargs).mean())
