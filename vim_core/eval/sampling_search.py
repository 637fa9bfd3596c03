"""Picking the sampling settings on the val split, so that the held-out split scores one setting only.

At our scale FID_domain moves by tens of points with the guidance scale: guidance buys class fidelity
with diversity, and where the balance lies depends on the model and how long it trained. Choosing it by
the held-out FID would flatter the reported number. So every candidate here draws the same balanced
classes from the same seed (common random numbers: the candidates differ by their setting, not by their
luck), a seed other than the reported samples' own, and is scored against images of the val split, the
split the caller passes as `reference`.

Two searches, each over the same grid for every model:
- conditional samples: first each guidance scale at plain sampling (the temperature nearest 1, the first
  top-k and top-p of the grid), then, at the scale picked, every temperature x top-k x top-p;
- unconditional samples (a conditional VIM's null class, or an unconditional VIM): no guidance, every
  temperature x top-k x top-p.
"""

import itertools
import time

import numpy as np
import torch

from vim_core.config.pipeline import SamplingSearchConfig
from vim_core.eval import fidelity
from vim_core.eval.classifier import class_accuracy, load_classifier
from vim_core.progress import Progress
from vim_core.tokenizer.export import Tokenizer
from vim_core.transformer.gpt import VIM
from vim_core.transformer.sampling import sample

SETTING = ("cfg_scale", "temperature", "top_k", "top_p")


def _plainness(row: dict) -> tuple:
    """Tie-break: nearer plain sampling (no guidance, temperature 1, no truncation) wins."""
    return (
        abs(row["cfg_scale"] - 1),
        abs(row["temperature"] - 1),
        row["top_k"] is not None,
        row["top_p"] is not None,
    )


def search_sampling(
    cfg: SamplingSearchConfig,
    vim: VIM,
    tokenizer: Tokenizer,
    classifier_path: str,
    reference: np.ndarray,
    num_classes: int,
    *,
    seed: int,
    batch_size: int | None = None,
    kid_subset_size: int = 500,
    uncond_vim: VIM | None = None,
) -> dict:
    """Search both grids; returns {"conditional": choice or None, "unconditional": choice, ...}.

    The unconditional grid samples `uncond_vim` (transformer.uncond's copy) when given, else `vim` with
    no label (an unconditional VIM's start, a class-conditional one's null class).

    `reference`: uint8 images of the val split. A choice holds the picked setting (SETTING keys), its
    fid_domain on val (and class_accuracy for conditional draws) and the whole grid it was picked from.
    With cfg.min_class_accuracy, only conditional candidates whose draws reach it compete (guidance that
    is too weak gives digits of the wrong class); if none does, the most class-faithful one is picked.
    """
    started = time.monotonic()
    classifier, _ = load_classifier(classifier_path)
    conditional = vim.num_classes > 0
    cond_labels = torch.arange(cfg.samples) % num_classes

    def score(setting: dict, labels: torch.Tensor | None, model: VIM = vim) -> dict:
        tokens = sample(model, cfg.samples, labels, seed=seed, batch_size=batch_size, **setting)
        images = tokenizer.decode_uint8(tokens)
        result = fidelity.domain_metrics(
            images, reference, classifier_path, kid_subset_size=kid_subset_size, seed=seed
        )
        row = {**setting, "fid_domain": round(result["fid_domain"], 3)}
        if labels is not None:  # what a lower FID costs in class fidelity; min_class_accuracy floors it
            row["class_accuracy"] = round(class_accuracy(classifier, images, labels.numpy()), 4)
        lines.update(1, fid_domain=row["fid_domain"])
        return row

    def settings(scales, temperatures, top_ks, top_ps) -> list[dict]:
        combos = itertools.product(scales, sorted(set(temperatures)), top_ks, top_ps)
        return [dict(zip(SETTING, c, strict=True)) for c in combos]

    truncations = (_unique(cfg.top_ks), _unique(cfg.top_ps))
    # Candidates: the unconditional grid, and for a conditional VIM each scale, then the grid at the scale
    # picked less its plain setting, which the scales already scored.
    grid = len(settings([1.0], cfg.temperatures, *truncations))
    total = grid + (len(set(cfg.cfg_scales)) + grid - 1 if conditional else 0)
    lines = Progress("evaluate sampling_search", total, unit="candidate")
    out: dict = {"conditional": None}
    if conditional:
        plain_t = min(cfg.temperatures, key=lambda t: (abs(t - 1), t))
        first = settings(sorted(set(cfg.cfg_scales)), [plain_t], truncations[0][:1], truncations[1][:1])
        grid = [score(s, cond_labels) for s in first]
        scale = _pick(grid, cfg.min_class_accuracy)["cfg_scale"]
        seen = [{k: r[k] for k in SETTING} for r in grid]
        second = [s for s in settings([scale], cfg.temperatures, *truncations) if s not in seen]
        grid += [score(s, cond_labels) for s in second]
        out["conditional"] = _choice(grid, cfg.min_class_accuracy)
    uncond_grid = [score(s, None, uncond_vim or vim) for s in settings([1.0], cfg.temperatures, *truncations)]
    out["unconditional"] = _choice(uncond_grid, None)
    out.update(
        samples=cfg.samples,
        reference=f"{len(reference)} val-split images (never the test split)",
        seed=seed,
        seconds=round(time.monotonic() - started, 1),
    )
    return out


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def _pick(grid: list[dict], floor: float | None) -> dict:
    eligible = [r for r in grid if floor is None or r["class_accuracy"] >= floor]
    if not eligible:
        eligible = [max(grid, key=lambda r: r["class_accuracy"])]
    return min(eligible, key=lambda r: (r["fid_domain"], _plainness(r)))


def _choice(grid: list[dict], floor: float | None) -> dict:
    best = _pick(grid, floor)
    rule = "lowest val fid_domain" + (
        f" among candidates with class_accuracy >= {floor}" if floor is not None else ""
    )
    return {
        **{k: best[k] for k in SETTING},
        "fid_domain_val": best["fid_domain"],
        "class_accuracy_val": best.get("class_accuracy"),
        "rule": rule,
        "grid": grid,
    }
