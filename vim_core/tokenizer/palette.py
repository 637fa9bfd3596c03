"""The iGPT baseline (Chen et al. 2020) as a tokenizer: pixels at reduced resolution, snapped to a palette.

iGPT area-downsamples images, fits a k-means colour palette (512 RGB clusters) on training pixels, and models
the palette index of each pixel in raster order. Wrapped in the tokenizer interface, the rest of the pipeline
(tokenize_dataset, pretrain_transformer, evaluate) runs on palette tokens unchanged, which makes "the same
VIM on palette tokens" the representation baseline of the paper's Claim 2.

Distances and k-means run in float64 with explicit per-channel sums, so a palette is bit-identical for the
same pixels and seed whatever the thread count, and encode agrees exactly with the assignment k-means used.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vim_core.config.tokenizer import TokenizerModelConfig
from vim_core.data.shards import iter_shards, read_manifest
from vim_core.errors import VimError
from vim_core.tokenizer.pixels import UInt8Codec, to_model_range

_CHUNK_ELEMENTS = 1 << 22  # (pixels x clusters) distances held at once: 32 MB of float64


def nearest(pixels: torch.Tensor, palette: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, squared distance) of the nearest palette colour for each pixel vector; (N, C), (K, C) in.

    Ties go to the lowest index. Computed in float64, in chunks, so memory stays bounded for large N x K.
    """
    x, p = pixels.double(), palette.double().to(pixels.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, len(p)))
    indices, dists = [], []
    for lo in range(0, len(x), chunk):
        part = x[lo : lo + chunk]
        d = torch.zeros(len(part), len(p), dtype=torch.float64, device=x.device)
        for c in range(x.shape[1]):  # explicit channel order: the same sum on any thread count
            d += (part[:, c, None] - p[None, :, c]) ** 2
        dist, idx = d.min(dim=1)
        indices.append(idx)
        dists.append(dist)
    if not indices:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
    return torch.cat(indices), torch.cat(dists)


class PaletteTokenizer(UInt8Codec, nn.Module):
    """Area-downsample to resolution^2, then each pixel's nearest palette colour is its token (raster order)."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        resolution: int,
        clusters: int,
        config: TokenizerModelConfig | None = None,
    ):
        super().__init__()
        self.image_size, self.channels, self.resolution = image_size, channels, resolution
        self.config = config
        # A buffer, not a parameter: nothing trains it, and it still saves with the state dict.
        self.register_buffer("palette", torch.zeros(clusters, channels))

    @property
    def codebook_size(self) -> int:
        return self.palette.shape[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.resolution, self.resolution)

    @property
    def num_tokens(self) -> int:
        return self.resolution * self.resolution

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, r, r) by area averaging, as iGPT reduces resolution."""
        if self.resolution == x.shape[-1]:
            return x
        return F.interpolate(x, size=self.grid_size, mode="area")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> palette ids (B, r*r) long, raster order."""
        pixels = rearrange(self.downsample(x.float()), "b c h w -> (b h w) c")
        return nearest(pixels, self.palette)[0].view(len(x), self.num_tokens)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Palette ids (B, r*r) -> images (B, C, H, W) in [-1, 1], nearest-neighbour upsampled."""
        colours = self.palette[indices.long()]
        small = rearrange(colours, "b (h w) c -> b c h w", h=self.resolution)
        if self.resolution == self.image_size:
            return small
        return F.interpolate(small, size=(self.image_size, self.image_size), mode="nearest")


def nearest_flops(n: int, k: int, c: int) -> int:
    """Arithmetic of nearest() on n pixels, k colours, c channels: per (pixel, colour) c subtractions,
    squares and additions, and one comparison for the minimum."""
    return n * k * (3 * c + 1)


def kmeans_flops(n: int, k: int, c: int, distance_passes: int, updates: int) -> int:
    """Analytic FLOP count of fit_palette (torch's FlopCounterMode counts matmuls and convolutions, and
    k-means is neither): k-means++ seeding (k one-colour distance passes, a cumulative sum and a running
    minimum), then the Lloyd loop's k-colour distance passes and centroid updates (sums and divisions)."""
    seeding = k * nearest_flops(n, 1, c) + (k - 1) * 2 * n
    return seeding + distance_passes * nearest_flops(n, k, c) + updates * (n * c + k * c)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to squared distance."""
    centers = [x[torch.randint(len(x), (1,), generator=gen).item()]]
    d2 = nearest(x, centers[0][None])[1]
    for _ in range(1, k):
        cum = torch.cumsum(d2, 0)  # sequential, so the draw is the same on any thread count
        total = cum[-1].item()
        if total > 0:  # u < total lands on a pixel with d2 > 0, one not yet a centre
            u = torch.tensor([torch.rand(1, generator=gen, dtype=torch.float64).item() * total])
            j = min(int(torch.searchsorted(cum, u, right=True)), len(x) - 1)
        else:  # fewer distinct pixels than clusters: the rest repeat a colour and stay unused
            j = 0
        centers.append(x[j])
        d2 = torch.minimum(d2, nearest(x, x[j][None])[1])
    return torch.stack(centers)


def _update(x: torch.Tensor, assign: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Centroids of the assignment; an empty cluster restarts at the pixel farthest from its centre."""
    counts = torch.bincount(assign, minlength=k)
    sums = torch.stack(
        [torch.bincount(assign, weights=x[:, c], minlength=k) for c in range(x.shape[1])], dim=1
    )  # bincount sums in order, unlike index_add on many threads
    new = sums / counts.clamp(min=1)[:, None]
    dist = dist.clone()
    for e in (counts == 0).nonzero()[:, 0].tolist():  # lowest index first: deterministic
        j = int(dist.argmax())
        new[e] = x[j]
        dist[j] = 0.0
    # Rounded to float32, the precision of the stored palette, so the fixed point k-means reaches is
    # exactly the assignment that encode computes.
    return new.float().double()


def fit_palette(
    pixels: np.ndarray | torch.Tensor, clusters: int, seed: int, iters: int = 300, stats: dict | None = None
) -> torch.Tensor:
    """k-means (k-means++ init, Lloyd until no assignment changes or `iters`) -> float32 (clusters, C).

    `stats`, when given, receives the Lloyd iterations run and the fit's FLOPs (kmeans_flops; the last
    distance pass may find no change, and then no update follows it).
    """
    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.asarray(pixels))
    # Float32 values (the palette's precision), float64 arithmetic: sums of them are then exact.
    x = x.detach().cpu().float().double()
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"fit_palette wants pixel vectors (N, C) with N > 0, got shape {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    centers = _kmeans_pp(x, clusters, gen).float().double()
    assign = None
    distance_passes, updates = 0, 0
    for _ in range(iters):
        new, dist = nearest(x, centers)
        distance_passes += 1
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centers = _update(x, assign, dist, clusters)
        updates += 1
    if stats is not None:
        stats["lloyd_iterations"] = distance_passes
        stats["flops"] = kmeans_flops(len(x), clusters, x.shape[1], distance_passes, updates)
    return centers.float()


@torch.inference_mode()
def _sample_pixels(model: PaletteTokenizer, data_root: str | Path, limit: int, seed: int) -> torch.Tensor:
    """A uniform sample (without replacement) of up to `limit` downsampled train pixel vectors.

    Every pixel draws a random key and the `limit` smallest keys win. Pixels are merged batch by batch and
    cut back to `limit` whenever twice that many are held, so memory stays bounded however large the split.
    """
    gen = torch.Generator().manual_seed(seed)
    pixels: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []

    def keep_smallest() -> None:
        order = torch.sort(torch.cat(keys), stable=True).indices[:limit]
        pixels[:], keys[:] = [torch.cat(pixels)[order]], [torch.cat(keys)[order]]

    for images, _ in iter_shards(data_root, "train"):
        for lo in range(0, len(images), 256):
            small = model.downsample(to_model_range(images[lo : lo + 256]))
            pixels.append(rearrange(small, "b c h w -> (b h w) c"))
            keys.append(torch.rand(len(pixels[-1]), generator=gen, dtype=torch.float64))
            if sum(map(len, keys)) >= 2 * limit:
                keep_smallest()
    if not keys:
        return torch.empty(0, model.channels)
    keep_smallest()
    return pixels[0]


def fit_palette_tokenizer(
    cfg: TokenizerModelConfig, data_root: str | Path, seed: int, stats: dict | None = None
) -> PaletteTokenizer:
    """Fit the palette of an arch-"palette" config on the train split of a prepared dataset.

    `stats`, when given, receives fit_palette's stats and the number of pixels fitted.
    """
    if cfg.arch != "palette":
        raise ValueError(f"fit_palette_tokenizer needs tokenizer.model.arch palette, got {cfg.arch!r}")
    manifest = read_manifest(data_root)
    size = manifest["image_size"]
    model = PaletteTokenizer(size, manifest["channels"], cfg.grid(size), cfg.palette_clusters, cfg)
    pixels = _sample_pixels(model, data_root, cfg.palette_fit_pixels, seed)
    if len(pixels) == 0:
        raise VimError(f"{data_root}: the train split holds no images to fit a palette on")
    model.palette.copy_(fit_palette(pixels, cfg.palette_clusters, seed, stats=stats))
    if stats is not None:
        stats["pixels"] = len(pixels)
    return model
