"""LPIPS-VGG perceptual distance (Zhang et al. 2018), from local weights files only.

Nothing is downloaded: torchvision's VGG16 file and the LPIPS v0.1 linear heads are looked up in
`weights_dir` (any fsspec URL) and loaded with `weights_only=True`, so no pickled code ever runs.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from vim_core.errors import VimError
from vim_core.io import find_weights

VGG16_FILE = "vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"  # torchvision names its files by the sha256 prefix
LPIPS_FILE = "lpips_vgg_v0.1.pth"  # `lpips/weights/v0.1/vgg.pth` from the lpips package, renamed
LPIPS_SHA256_PREFIX = None

# End (exclusive) of each torchvision vgg16.features slice: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input scaling for [-1, 1] images.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _load_state(path: str, filename: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the user's to replace
        raise VimError(
            f"cannot read weights file {filename} at {path}: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(state, dict):
        raise VimError(f"weights file {filename} at {path} does not hold a state dict")
    return state


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG: forward(x, y) on [-1, 1] images (B, 1 or 3, H, W) -> distance per image (B,)."""

    def __init__(self, weights_dir: str, verify_checksums: bool = True):
        super().__init__()
        purpose = "the LPIPS perceptual loss (perceptual_weight > 0)"
        vgg_path = find_weights(
            weights_dir, VGG16_FILE, VGG16_SHA256_PREFIX if verify_checksums else None, purpose
        )
        lin_path = find_weights(
            weights_dir, LPIPS_FILE, LPIPS_SHA256_PREFIX if verify_checksums else None, purpose
        )
        features = make_layers(cfgs["D"])  # torchvision's vgg16.features, without the 120M-param classifier
        vgg_state = _load_state(vgg_path, VGG16_FILE)
        feature_state = {
            k.removeprefix("features."): v for k, v in vgg_state.items() if k.startswith("features.")
        }
        try:
            features.load_state_dict(feature_state)
        except RuntimeError as err:
            raise VimError(
                f"{VGG16_FILE} does not match torchvision's vgg16: {str(err).splitlines()[0]}"
            ) from None
        starts = (0,) + _SLICE_ENDS[:-1]
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, _SLICE_ENDS, strict=True))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        lin_state = _load_state(lin_path, LPIPS_FILE)
        for i, lin in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"  # the lpips package's naming (model.0 is a dropout)
            if key not in lin_state or lin_state[key].shape != lin.weight.shape:
                raise VimError(f"{LPIPS_FILE} lacks {key} of shape {tuple(lin.weight.shape)}")
            lin.weight.data.copy_(lin_state[key])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen and deterministic

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale: VGG wants three channels
        h = (x - self.shift) / self.scale
        out = []
        for s in self.slices:
            h = s(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dist = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        for lin, fx, fy in zip(self.lins, self._features(x), self._features(y), strict=True):
            diff = (_unit_channels(fx) - _unit_channels(fy)).pow(2)
            dist = dist + F.adaptive_avg_pool2d(lin(diff), 1).flatten().float()
        return dist
