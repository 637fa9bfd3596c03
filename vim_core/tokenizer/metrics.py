"""Tokenizer metrics: codebook usage (the paper's definition), perplexity, PSNR, L1/L2."""

import numpy as np
import torch

from vim_core.timing import time_calls
from vim_core.tokenizer.quantizer import perplexity_from_counts


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def codebook_usage(indices: torch.Tensor | np.ndarray, codebook_size: int, batch_size: int = 256) -> float:
    """Fraction of codes used per batch of `batch_size` test images, averaged over batches (paper, Table 3).

    `indices` holds one row of token ids per image (N, ...). Images are taken in the given order. A last
    partial batch would see fewer tokens and so report a lower usage, so it is left out whenever there is at
    least one full batch; with fewer than `batch_size` images the single partial batch is all there is.
    """
    idx = _as_tensor(indices).long()
    if idx.ndim == 0 or idx.shape[0] == 0:
        raise ValueError("codebook_usage needs at least one image's tokens")
    idx = idx.reshape(idx.shape[0], -1)
    n = idx.shape[0]
    full = n // batch_size
    batches = [idx[i * batch_size : (i + 1) * batch_size] for i in range(full)] if full else [idx]
    used = [torch.bincount(b.flatten(), minlength=codebook_size)[:codebook_size].gt(0).sum() for b in batches]
    return float(torch.stack(used).float().mean() / codebook_size)


def codebook_perplexity(indices: torch.Tensor | np.ndarray, codebook_size: int) -> float:
    """exp(entropy) of the code histogram over all given tokens; equals K for uniform usage."""
    idx = _as_tensor(indices).long().flatten()
    return float(perplexity_from_counts(torch.bincount(idx, minlength=codebook_size)))


def l1_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    return (x.float() - y.float()).abs().mean()


def l2_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return (x.float() - y.float()).pow(2).mean()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of images scaled to [0, data_range], computed per image and then averaged.

    Per-image averaging is the common convention; a perfect image is capped at 100 dB instead of inf.
    """
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    per_image = 10 * torch.log10(data_range**2 / mse.clamp(min=1e-10))
    return per_image.mean()


@torch.inference_mode()
def throughput(
    model: torch.nn.Module,
    channels: int,
    image_size: int,
    device: torch.device,
    batch: int = 64,
    repeats: int = 5,
) -> dict:
    """Encoder and decoder images/s (paper Table 2), warm, at a fixed batch on this machine.

    encode is image -> token ids (encoder + quantizer), decode is ids -> image; each is timed as the best
    of `repeats` runs after one warm-up, so a background blip does not decide the figure.
    """
    was_training = model.training
    model.eval()
    x = torch.rand((batch, channels, image_size, image_size), generator=torch.Generator().manual_seed(0))
    x = x.to(device) * 2 - 1
    ids = model.encode(x)

    def best(fn) -> float:
        return batch / min(time_calls(fn, device, repeats))

    out = {
        "encode_images_per_s": round(best(lambda: model.encode(x)), 1),
        "decode_images_per_s": round(best(lambda: model.decode(ids)), 1),
        "throughput_definition": f"images/s at batch {batch}, best of {repeats} warm runs, "
        f"{torch.get_num_threads()} threads on {device.type}",
    }
    model.train(was_training)
    return out
