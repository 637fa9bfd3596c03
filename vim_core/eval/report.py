"""The evaluate step: every number the paper reports, on our data, each with how it was computed."""

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vim_core.config import Params
from vim_core.data.shards import load_split, read_manifest
from vim_core.errors import VimError
from vim_core.eval import fidelity
from vim_core.eval.classifier_stage import load_trained
from vim_core.eval.generation import generation_metrics
from vim_core.eval.grids import image_grid
from vim_core.eval.probe import extract_block_features, extract_features, probe_blocks, probe_with_config
from vim_core.eval.reconstruction import reconstruction_metrics
from vim_core.io import spec_hash
from vim_core.progress import Progress, phase
from vim_core.tokenizer.export import Tokenizer, load_tokenizer
from vim_core.train.tracking import save_image
from vim_core.transformer.export import load_transformer
from vim_core.transformer.gpt import VIM

log = logging.getLogger(__name__)


def eval_config_spec(params: Params) -> dict:
    """What decides what an eval metric means: the eval and sampling settings (not where files live) and
    the version of the prepared data (all three splits). Not the run's seed: runs of several seeds compare."""
    # probes/sampling only skip metrics; they change the meaning of none that is present
    skip = {"classifier_dir", "weights_dir", "probes", "sampling"}
    evaluate = params.evaluate.model_dump(mode="json", exclude=skip)
    if evaluate["sampling_search"] is None:  # left out when off, as before the search existed
        del evaluate["sampling_search"]
    return {
        "evaluate": evaluate,
        "test_data": read_manifest(params.data.out_dir).get("version"),
        "sampling": params.transformer.sampling.model_dump(mode="json"),
    }


def eval_config_hash(params: Params) -> str:
    """Two models are comparable only if this matches: same eval settings, same test data.

    eval.json records it and the registry's `vim.eval_config_hash` tags carry it; promotion compares them.
    """
    return spec_hash(eval_config_spec(params))


def _balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def eval_seed(params: Params) -> int:
    """The run's seed plus evaluate.seed: sampling draws and the probe subset follow the training seed."""
    return params.seed + params.evaluate.seed


def evaluate(params: Params, plots_dir: str | Path = "plots") -> dict:
    """Compute eval.json's content. Reads the prepared data, both classifiers, the tokenizer and the VIM.

    Every choice (sampling settings, probe block and weight decay) is made on the val split; the test
    split only scores the choices.
    """
    e = params.evaluate
    seed = eval_seed(params)
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    started = time.monotonic()
    torch.manual_seed(seed)
    manifest = read_manifest(params.data.out_dir)
    if manifest["splits"].get("val", {}).get("count", 0) == 0:
        raise VimError(
            f"{params.data.out_dir}: no val split to make the evaluation's choices on (data.val_fraction)"
        )
    train_x, train_y = load_split(params.data.out_dir, "train")
    val_x, val_y = load_split(params.data.out_dir, "val")
    test_x, test_y = load_split(params.data.out_dir, "test")
    num_classes = manifest["num_classes"]
    clf_path, scorer_path, clf_report = load_trained(e.classifier_dir, params.data.out_dir)
    tokenizer = load_tokenizer(str(Path(params.tokenizer.out_dir) / "tokenizer.safetensors")).eval()
    vim, _ = load_transformer(str(Path(params.transformer.out_dir) / "transformer.safetensors"))
    uncond_vim = _uncond_vim(params) if vim.num_classes > 0 else None

    n_ref = len(test_x)
    domain = {
        "extractor": "the domain classifier (penultimate features for FID/KID, logits for IS, argmax for "
        "class accuracy); rejection is scored by the independent scorer (definitions.rejection)",
        "classifier": clf_path,
        "classifier_test_accuracy": clf_report["classifier_test_accuracy"],
        "scorer": scorer_path,
        "scorer_test_accuracy": clf_report["scorer_test_accuracy"],
        "reference": f"test split ({n_ref} images); the *_val keys: the val split",
        "kid_subset_size": e.kid_subset_size,
        "seed": seed,
    }
    out: dict = {"definitions": {"domain_metrics": domain}}

    def dm(images: np.ndarray, reference: np.ndarray) -> dict:
        result = fidelity.domain_metrics(
            images, reference, clf_path, kid_subset_size=e.kid_subset_size, seed=seed
        )
        out["definitions"].setdefault("torch_fidelity", result.pop("definition"))
        return {k: round(v, 5) for k, v in result.items()}

    grids = None
    if e.sampling:
        gen, defs, grids = generation_metrics(
            params,
            vim,
            tokenizer,
            (clf_path, scorer_path),
            val_x,
            test_x,
            num_classes,
            seed,
            dm,
            timings,
            uncond_vim,
        )
        out.update(gen)
        out["definitions"].update(defs)
    else:
        skipped = {"skipped": "evaluate.sampling is false: no search, samples, class accuracy or rejection"}
        out["definitions"].update(generation=skipped, rejection=skipped, generation_uncond=skipped)

    baselines, out["definitions"]["baselines"] = _baselines(params, tokenizer, train_x, test_x, dm, seed)
    out.update(baselines)
    t = time.monotonic()
    recon_metrics, out["definitions"]["reconstruction"], test_tokens, recon = reconstruction_metrics(
        tokenizer, test_x, dm
    )
    out.update(recon_metrics)
    timings["reconstruction"] = round(time.monotonic() - t, 1)

    # Linear probe, beside two baselines on the same splits.
    if e.probes:
        phase("evaluate", "probe", "every block, the pixels, a random-init VIM")
        t = time.monotonic()
        splits = (train_x, train_y, val_x, val_y, test_x, test_y)
        out.update(_probe(params, vim, tokenizer, splits, test_tokens, num_classes, seed))
        timings["probe"] = round(time.monotonic() - t, 1)
    else:
        out["probe_definition"] = "skipped: evaluate.probes is false"

    _write_grids(plots, grids, test_x, recon, num_classes)
    timings["total"] = round(time.monotonic() - started, 1)
    out["timings_seconds"] = timings
    out["eval_config_hash"] = eval_config_hash(params)
    return out


def _uncond_vim(params: Params) -> VIM | None:
    """The unconditional copy that transformer.uncond trains beside the class-conditional VIM, if set."""
    section = params.transformer.uncond_section()
    if section is None:
        return None
    path = Path(section.out_dir) / "transformer.safetensors"
    if not path.is_file():
        raise VimError(f"{path} is missing (transformer.uncond is set); run dvc repro first")
    return load_transformer(str(path))[0]


def _baselines(params: Params, tokenizer: Tokenizer, train_x, test_x, dm, seed: int) -> tuple[dict, dict]:
    """Floor (real train images) and ceiling (unigram tokens) FID_domain, on the same pipeline."""
    n = params.evaluate.num_samples
    phase("evaluate", "baselines", "real and unigram FID_domain")
    floor_rows = np.random.default_rng(seed).permutation(len(train_x))
    k = min(n, len(train_x))
    metrics = {
        "fid_domain_real": dm(train_x[floor_rows[:k]], test_x)["fid_domain"],
        "fid_domain_unigram": dm(_unigram_images(params, tokenizer, n, seed), test_x)["fid_domain"],
    }
    definitions = {
        "fid_domain_real": f"{k} train images vs the test split (floor)",
        "fid_domain_unigram": f"{n} images decoded from tokens drawn i.i.d. from the train split's token "
        "frequencies, vs the test split (ceiling)",
    }
    return metrics, definitions


def _write_grids(plots: Path, grids: dict | None, test_x, recon, num_classes: int) -> None:
    """The sample, rejection and reconstruction grids; blank sample grids when sampling was skipped."""
    if grids is not None:
        _grids(plots, grids["images"], grids["labels"], grids["scores"], test_x, recon, num_classes)
        save_image(image_grid(grids["uncond"][:64]), plots / "samples_uncond.png")
        return
    # dvc.yaml declares these plots: a skipped sampling leaves blank grids, not stale or missing ones
    blank = np.zeros((num_classes * 8, *test_x.shape[1:]), dtype=np.uint8)
    labels = _balanced_labels(len(blank), num_classes)
    _grids(plots, blank, labels, torch.zeros(len(blank)), test_x, recon, num_classes)
    save_image(image_grid(blank[:64]), plots / "samples_uncond.png")


def _unigram_images(params: Params, tokenizer: Tokenizer, n: int, seed: int) -> np.ndarray:
    tokens, _ = load_split(params.transformer.tokens_dir, "train")
    counts = np.bincount(tokens.astype(np.int64).ravel(), minlength=tokenizer.codebook_size).astype(
        np.float64
    )
    gen = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(
        torch.from_numpy(counts / counts.sum()), n * tokens.shape[1], replacement=True, generator=gen
    )
    return tokenizer.decode_uint8(draws.view(n, -1))


def _probe(
    params: Params, vim: VIM, tokenizer: Tokenizer, splits: tuple, test_tokens, num_classes: int, seed: int
) -> dict:
    """Probe accuracies on test; block and weight decays chosen on the val split's features."""
    train_x, train_y, val_x, val_y, test_x, test_y = splits
    p = params.transformer.probe
    # one unit per feature set probed: each block, the pixels, the random-init VIM
    lines = Progress("evaluate probe", vim.cfg.layers + 2, unit="set")
    limit = params.evaluate.max_probe_train or len(train_x)
    idx = np.random.default_rng(seed).permutation(len(train_x))[:limit]
    tr_x, tr_y = train_x[idx], train_y[idx]
    tr_tokens = tokenizer.encode_uint8(tr_x)
    val_tokens = tokenizer.encode_uint8(val_x)
    # Every block is probed (the curve over depth); the val split alone picks the block.
    curve = probe_blocks(
        p,
        extract_block_features(vim, tr_tokens),
        tr_y,
        extract_block_features(vim, test_tokens),
        test_y,
        num_classes,
        seed,
        val=(extract_block_features(vim, val_tokens), val_y),
        lines=lines,
    )
    block = curve["block"]
    chosen: dict[str, float] = {"vim": curve["weight_decay"]}

    def probe(name: str, features: Callable) -> float:
        res = probe_with_config(
            p,
            features(tr_x, tr_tokens),
            tr_y,
            features(test_x, test_tokens),
            test_y,
            num_classes,
            seed,
            val=(features(val_x, val_tokens), val_y),
        )
        chosen[name] = res["weight_decay"]
        lines.update(1, features=name)
        return round(res["accuracy"], 4)

    torch.manual_seed(seed)
    random_vim = VIM.from_spec(vim.spec()).eval()
    out = {
        "probe_accuracy": round(curve["accuracy"], 4),
        "probe_block": block,
        "probe_test_accuracy_by_block": dict(enumerate(curve["test_accuracy_by_block"])),
        "probe_val_accuracy_by_block": dict(enumerate(curve["val_accuracy_by_block"])),
        "probe_accuracy_pixels": probe("pixels", lambda x, _: x.reshape(len(x), -1).astype(np.float32)),
        "probe_accuracy_random_init": probe(
            "random_init", lambda _, tokens: extract_features(random_vim, tokens, block=block)
        ),
    }
    out["probe_weight_decays"] = chosen
    out["probe_definition"] = (
        f"softmax linear classifier (L-BFGS, {p.epochs} iterations, standardised features) on the average-"
        f"pooled, layer-normalised output of each of the {vim.cfg.layers} blocks; block indices are 0-based "
        f"(block 0 is the first Transformer block); probe_block = {block}, {curve['selection']}; "
        f"fitted on {len(tr_x)} train images (seed {seed}); weight decay picked per feature set from "
        f"{p.weight_decays} by accuracy on the val split ({len(val_x)} images; chosen: {chosen}); the "
        "probe_accuracy* keys are on the whole test split, which chooses nothing; the pixel and "
        "random-init baselines use the same splits, the random-init VIM the chosen block"
    )
    return out


def _grids(plots: Path, images, labels, scores, test_x, recon, num_classes: int) -> None:
    """`labels`: the requested classes, or for an unconditional model the classifier's predictions."""
    per_class = 8
    rows = []
    for c in range(num_classes):
        idx = (labels == c).nonzero()[:, 0][:per_class].numpy()
        if len(idx) < per_class:  # a class the unconditional model rarely draws: pad with blanks
            blank = np.zeros((per_class - len(idx), *images.shape[1:]), dtype=images.dtype)
            rows.append(np.concatenate([images[idx], blank]))
        else:
            rows.append(images[idx])
    save_image(image_grid(np.concatenate(rows), columns=per_class), plots / "samples_per_class.png")
    pairs = np.stack([test_x[:32], recon[:32]], axis=1).reshape(-1, *test_x.shape[1:])
    save_image(image_grid(pairs, columns=16), plots / "reconstructions.png")
    order = torch.argsort(scores)
    rejected = images[order[:32].numpy()]
    accepted = images[order[-32:].numpy()]
    save_image(
        image_grid(np.concatenate([rejected, accepted]), columns=16),
        plots / "rejection_rejected_vs_accepted.png",
    )
