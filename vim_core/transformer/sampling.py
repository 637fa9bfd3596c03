"""Drawing token grids from a VIM: temperature, top-k/top-p, classifier-free guidance, and which
samples a classifier's scores keep (rejection sampling; vim_core.eval.report does the scoring).

Random numbers come from one torch.Generator, one draw per step over the same (n, vocab) shape whether
or not the KV cache is used, so a seed gives the same tokens in both paths.
"""

import math
from collections.abc import Sequence

import torch
from tqdm import tqdm

from vim_core.config.transformer import RejectionConfig
from vim_core.errors import VimError
from vim_core.transformer.gpt import VIM


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row; the rest become -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (nucleus)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Mass strictly before each token; the top token always survives since its mass-before is 0.
    remove_sorted = (probs.cumsum(dim=-1) - probs) >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of (n, V) logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _labels_tensor(model: VIM, n: int, labels, device: torch.device) -> torch.Tensor | None:
    if model.num_classes == 0:
        if labels is not None:
            raise VimError("labels were given but the transformer is unconditional (num_classes: 0)")
        return None
    if labels is None:  # a conditional model samples p(x) through its null class
        return torch.full((n,), model.null_class, dtype=torch.long, device=device)
    if isinstance(labels, int):
        labels = [labels] * n
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.shape[0] != n:
        raise VimError(f"got {labels.shape[0]} labels for {n} samples")
    if labels.min() < 0 or labels.max() >= model.num_classes:
        raise VimError(f"labels must lie in [0, {model.num_classes}); got {labels.min()}..{labels.max()}")
    return labels


@torch.inference_mode()
def _sample_batch(
    model: VIM,
    labels: torch.Tensor | None,
    n: int,
    generator: torch.Generator | None,
    use_cache: bool,
    device: torch.device,
    progress: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    cfg_scale: float,
) -> torch.Tensor:
    guided = cfg_scale != 1.0
    if guided:
        # Conditional and null-class rows run as one batch; their logits are mixed below.
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
    rows = labels.shape[0] if labels is not None else n
    seq = torch.zeros(rows, model.seq_len, dtype=torch.long, device=device)
    cache = model.make_cache(rows, device=device) if use_cache else None
    for i in tqdm(range(model.seq_len), disable=not progress, desc="sampling", leave=False):
        if cache is not None:
            # Step 0 feeds only the prefix; step i feeds t_{i-1} at sequence index i.
            logits, _ = model(seq[:, max(i - 1, 0) : i], labels, cache=cache, input_pos=i)
        else:
            logits, _ = model(seq[:, :i], labels)
        logits = logits[:, -1].float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        nxt = sample_logits(logits, temperature, top_k, top_p, generator)
        seq[:, i] = nxt.repeat(2) if guided else nxt
    return seq[:n].clone()


def sample(
    model: VIM,
    n: int,
    labels: int | Sequence[int] | torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw n token grids (n, L) long in raster order.

    labels: one class for all, one per sample, or None (unconditional; a conditional model then uses its
    null class). cfg_scale 1.0 is plain sampling; s mixes logits as uncond + s * (cond - uncond).
    seed makes a fresh generator; pass generator instead to continue a stream. use_cache=False recomputes
    the whole prefix each step and gives the same tokens (it exists to check and benchmark the cache).
    """
    device = torch.device(device) if device is not None else model.head.weight.device
    if cfg_scale != 1.0 and (model.num_classes == 0 or labels is None):
        raise VimError("cfg_scale != 1 needs a class-conditional transformer and labels")
    if top_k is not None and top_k < 1:
        raise VimError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise VimError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise VimError(f"temperature must be >= 0, got {temperature}")
    label_t = _labels_tensor(model, n, labels, device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        chunks = []
        step = batch_size or max(n, 1)
        for lo in range(0, n, step):
            part = label_t[lo : lo + step] if label_t is not None else None
            rows = min(step, n - lo)
            chunks.append(_sample_batch(model, part, rows, generator, use_cache, device, progress, **opts))
    finally:
        model.train(was_training)
    if not chunks:
        return torch.zeros(0, model.seq_len, dtype=torch.long, device=device)
    return torch.cat(chunks)


def select_by_score(
    scores: torch.Tensor, labels: torch.Tensor | None, config: RejectionConfig
) -> torch.Tensor:
    """Boolean keep-mask over samples given each one's probability for its requested class.

    acceptance_rate keeps the round(rate * count) best-scored samples of each requested class, so the
    class balance of the request survives rejection; threshold keeps every score >= threshold.
    """
    if config.mode == "threshold":
        return scores >= config.threshold
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if labels is None:
        groups = [torch.arange(len(scores))]
    else:
        groups = [(labels == c).nonzero()[:, 0] for c in labels.unique()]
    for idx in groups:
        k = max(1, math.floor(config.acceptance_rate * len(idx) + 0.5))
        best = torch.topk(scores[idx], k).indices
        keep[idx[best]] = True
    return keep
