"""Pixels and token ids: the uint8 <-> model-range conversions and the batched codec every tokenizer
shares, in a module of their own so that each tokenizer kind can use them without importing the others."""

import itertools

import numpy as np
import torch


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (numpy or torch) -> float32 in [-1, 1]."""
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got {t.dtype}")
    return t.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (clamped) -> uint8 pixels."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class UInt8Codec:
    """Batched uint8 pixels <-> token ids for any nn.Module tokenizer with encode(x) and decode(ids).

    Batches are cut in order from the start, so a given batch_size gives bit-identical results to a loop
    over the same slices; models on CPU are not guaranteed bit-identical across batch sizes.
    """

    def _device(self) -> torch.device:
        first = next(itertools.chain(self.parameters(), self.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    @torch.inference_mode()
    def encode_uint8(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> token ids (N, L) long on the CPU, encoded on the model's device."""
        device = self._device()
        parts = [
            self.encode(to_model_range(images[lo : lo + batch_size]).to(device)).cpu()
            for lo in range(0, len(images), batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.num_tokens, dtype=torch.long)

    @torch.inference_mode()
    def decode_uint8(self, tokens: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Token ids (N, L), any integer dtype (token shards are uint16) -> uint8 images (N, C, H, W)."""
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.from_numpy(np.asarray(tokens).astype(np.int64))
        device = self._device()
        parts = [
            to_uint8(self.decode(tokens[lo : lo + batch_size].to(device))).cpu().numpy()
            for lo in range(0, len(tokens), batch_size)
        ]
        if not parts:
            return np.zeros((0, self.channels, self.image_size, self.image_size), dtype=np.uint8)
        return np.concatenate(parts)
