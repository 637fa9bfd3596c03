"""Linear probe: a softmax classifier on frozen features (VIM blocks, raw pixels, or a random-init VIM)."""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from vim_core.config.pipeline import ProbeConfig
from vim_core.errors import VimError
from vim_core.progress import Progress
from vim_core.transformer.gpt import VIM


def _batched(model: VIM, tokens, labels, batch_size: int, device, features) -> list[torch.Tensor]:
    """features(x, y) over batches of tokens in eval mode, without gradients; outputs on the CPU, float32."""
    device = torch.device(device) if device is not None else model.head.weight.device
    tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens).long()
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).long()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return [
                features(
                    tokens[lo : lo + batch_size].to(device),
                    labels[lo : lo + batch_size].to(device) if labels is not None else None,
                )
                .float()
                .cpu()
                for lo in range(0, len(tokens), batch_size)
            ]
    finally:
        model.train(was_training)


def extract_features(
    model: VIM,
    tokens: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
    block: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Average-pooled features (N, dim) float32 on CPU of `block` (default: the middle one).

    Leave labels None for probing: a conditional model then sees its null class, not the answer.
    """
    out = _batched(model, tokens, labels, batch_size, device, lambda x, y: model.features(x, y, block))
    return torch.cat(out) if out else torch.zeros(0, model.cfg.dim)


def extract_block_features(
    model: VIM,
    tokens: torch.Tensor | np.ndarray,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """extract_features() of every block at once: (layers, N, dim) float32 on CPU; the null class for a
    conditional model, as for probing."""
    out = _batched(model, tokens, None, batch_size, device, lambda x, y: torch.stack(model.block_features(x)))
    return torch.cat(out, dim=1) if out else torch.zeros(model.cfg.layers, 0, model.cfg.dim)


def _as_float(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x.detach().cpu())
    return x.reshape(len(x), -1).double()


def train_linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-2,
    seed: int = 0,
    method: Literal["lbfgs", "adam"] = "lbfgs",
    batch_size: int = 1024,
    score_also: tuple | None = None,
) -> dict:
    """Fit softmax(W x + b) on train features standardised by train statistics; score on test.

    lbfgs: full batch, `epochs` iterations, lr is its step scale (1.0 with a line search).
    adam: mini-batches shuffled by `seed`, `epochs` passes. Both minimise mean cross-entropy plus
    weight_decay/2 * ||W||^2, in float64 so the result does not depend on summation order.
    score_also: a second (features, labels) set the same fit is scored on (also_accuracy, also_num).
    """
    xtr, xte = _as_float(train_x), _as_float(test_x)
    ytr = torch.as_tensor(np.asarray(train_y)).long().reshape(-1)
    yte = torch.as_tensor(np.asarray(test_y)).long().reshape(-1)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise VimError("probe: features and labels differ in length")
    if len(xtr) == 0 or len(xte) == 0:
        raise VimError("probe: the train and test splits must not be empty")
    if xtr.shape[1] != xte.shape[1]:
        raise VimError(f"probe: train has {xtr.shape[1]} features, test {xte.shape[1]}")

    mean, std = xtr.mean(0), xtr.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant features (blank pixels) stay 0
    xtr, xte = (xtr - mean) / std, (xte - mean) / std

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(xtr.shape[1], num_classes, generator=gen, dtype=torch.float64) * 0.01).requires_grad_()
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)

    def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()

    if method == "lbfgs":
        opt = torch.optim.LBFGS([w, b], lr=lr, max_iter=epochs, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = objective(xtr, ytr)
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(epochs):
            for idx in torch.randperm(len(xtr), generator=gen).split(batch_size):
                opt.zero_grad()
                objective(xtr[idx], ytr[idx]).backward()
                opt.step()

    with torch.no_grad():
        train_logits, test_logits = xtr @ w + b, xte @ w + b
        also = {}
        if score_also is not None:
            xa = (_as_float(score_also[0]) - mean) / std
            ya = torch.as_tensor(np.asarray(score_also[1])).long().reshape(-1)
            also = {
                "also_accuracy": float(((xa @ w + b).argmax(1) == ya).double().mean()),
                "also_num": len(ya),
            }
        return {
            **also,
            "accuracy": float((test_logits.argmax(1) == yte).double().mean()),
            "train_accuracy": float((train_logits.argmax(1) == ytr).double().mean()),
            "test_loss": float(F.cross_entropy(test_logits, yte)),
            "num_train": len(xtr),
            "num_test": len(xte),
            "feature_dim": int(xtr.shape[1]),
            "num_classes": num_classes,
            "chance": float(1.0 / num_classes),
        }


def run_fits(fits: list[Callable[[], dict]]) -> list[dict]:
    """Run independent probe fits side by side, each on one torch thread; results in order.

    A fit is a chain of small float64 products (N x d by d x classes) between L-BFGS's Python steps. On
    this 2-core CPU one thread runs a VIM block's fit in 4.4 s and two threads take 5.5 s, while two
    single-threaded fits at once take about the time of one. A fit's result does not depend on the
    schedule: each runs on one thread whatever the machine has.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, min(len(fits), previous))) as pool:
            return list(pool.map(lambda fit: fit(), fits))
    finally:
        torch.set_num_threads(previous)


def select_and_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes: int,
    weight_decays: list[float],
    val_fraction: float = 0.2,
    seed: int = 0,
    val: tuple | None = None,
    **kwargs,
) -> dict:
    """Pick the weight decay on validation rows, then score the pick on test.

    `val`: (features, labels) of a validation split; each value of the grid is fitted on all the train
    rows and scored on val, and the pick's fit is the one scored on test. Without it, val_fraction of the
    train rows are held out to pick, and the pick is refitted on all of them (callers with no val split).
    Each feature set (VIM blocks, pixels, a random-init VIM) gets its own best regularisation from the
    same grid, so no baseline is handicapped by a value tuned for another. Only val scores choose.
    """
    train_y = np.asarray(train_y).reshape(-1)
    if val is not None:
        return _select_on_val(train_x, train_y, test_x, test_y, num_classes, weight_decays, seed, val, kwargs)
    n = len(train_y)
    n_val = int(round(n * val_fraction))
    if not 0 < n_val < n:
        raise VimError(f"probe: val_fraction {val_fraction} leaves no validation or fit rows of {n}")
    # The held-out scores pick the weight decay, and also rank blocks in probe_blocks, so they are
    # computed even for a one-value grid.
    order = np.random.default_rng(seed).permutation(n)
    held, fit = order[:n_val], order[n_val:]
    tx = train_x[fit] if not torch.is_tensor(train_x) else train_x[torch.as_tensor(fit)]
    vx = train_x[held] if not torch.is_tensor(train_x) else train_x[torch.as_tensor(held)]
    fits = [
        partial(
            train_linear_probe,
            tx,
            train_y[fit],
            vx,
            train_y[held],
            num_classes,
            weight_decay=wd,
            seed=seed,
            **kwargs,
        )
        for wd in weight_decays
    ]
    scores = {wd: res["accuracy"] for wd, res in zip(weight_decays, run_fits(fits), strict=True)}
    best = max(scores, key=lambda wd: (scores[wd], wd))
    (out,) = run_fits(
        [
            partial(
                train_linear_probe,
                train_x,
                train_y,
                test_x,
                test_y,
                num_classes,
                weight_decay=best,
                seed=seed,
                **kwargs,
            )
        ]
    )
    return _with_choice(out, best, scores)


def _select_on_val(train_x, train_y, test_x, test_y, num_classes, weight_decays, seed, val, kwargs) -> dict:
    """One fit per weight decay on all train rows, scored on val (the choice) and on test (the report)."""
    val_x, val_y = val
    fits = [
        partial(
            train_linear_probe,
            train_x,
            train_y,
            val_x,
            val_y,
            num_classes,
            weight_decay=wd,
            seed=seed,
            score_also=(test_x, test_y),
            **kwargs,
        )
        for wd in weight_decays
    ]
    results = dict(zip(weight_decays, run_fits(fits), strict=True))
    scores = {wd: res["accuracy"] for wd, res in results.items()}
    best = max(scores, key=lambda wd: (scores[wd], wd))
    chosen = results[best]
    out = {**chosen, "accuracy": chosen["also_accuracy"], "num_test": chosen["also_num"]}
    return _with_choice(out, best, scores)


def _with_choice(out: dict, best: float, scores: dict) -> dict:
    out["weight_decay"] = best
    out["val_accuracy"] = scores[best]
    out["val_accuracy_by_weight_decay"] = {repr(wd): round(acc, 4) for wd, acc in scores.items()}
    return out


def probe_with_config(
    cfg: ProbeConfig, train_x, train_y, test_x, test_y, num_classes: int, seed: int = 0, val=None
) -> dict:
    """select_and_probe with the settings of `transformer.probe` (grid, iterations); `val` as there."""
    return select_and_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes,
        cfg.weight_decays,
        val_fraction=cfg.val_fraction,
        seed=seed,
        val=val,
        epochs=cfg.epochs,
    )


def probe_blocks(
    cfg: ProbeConfig,
    train_feats,
    train_y,
    test_feats,
    test_y,
    num_classes: int,
    seed: int = 0,
    val=None,
    lines: Progress | None = None,
) -> dict:
    """Probe every block (features (layers, N, dim)) and pick one on validation rows, never on test.

    `val`: (features (layers, M, dim), labels) of the val split; None holds out cfg.val_fraction of the
    train rows instead. The block is cfg.block when set (0-based), else the one with the best val
    accuracy (ties go to the shallower block). Every block's test accuracy is returned too, as the curve
    over depth, but only the val score chooses. Block 0 is the first Transformer block. `lines` counts
    one unit per block probed.
    """

    def block(b: int) -> dict:
        result = probe_with_config(
            cfg,
            train_feats[b],
            train_y,
            test_feats[b],
            test_y,
            num_classes,
            seed,
            val=(val[0][b], val[1]) if val is not None else None,
        )
        if lines is not None:
            lines.update(1, features=f"block {b}")
        return result

    results = [block(b) for b in range(len(train_feats))]
    if cfg.block is not None:
        if not 0 <= cfg.block < len(results):
            raise VimError(f"transformer.probe.block {cfg.block} is out of range for {len(results)} blocks")
        chosen, how = cfg.block, "fixed by transformer.probe.block"
    else:
        chosen = max(range(len(results)), key=lambda b: (results[b]["val_accuracy"], -b))
        where = "the val split" if val is not None else f"{cfg.val_fraction:.0%} of the train rows held out"
        how = f"best accuracy on {where} (not the test split)"
    return {
        "block": chosen,
        "selection": how,
        "accuracy": results[chosen]["accuracy"],
        "weight_decay": results[chosen]["weight_decay"],
        "val_accuracy_by_block": [round(r["val_accuracy"], 4) for r in results],
        "test_accuracy_by_block": [round(r["accuracy"], 4) for r in results],
    }
