"""The evaluate step: every number the paper reports, on our data, each with how it was computed."""

import logging
import time
from pathlib import Path

import numpy as np
import torch

from vim_core.config import Params
from vim_core.data.shards import load_split, read_manifest
from vim_core.eval import fidelity
from vim_core.eval.classifier import (
    class_accuracy,
    load_classifier,
    predict_proba,
    save_classifier,
    train_classifier,
)
from vim_core.eval.grids import image_grid
from vim_core.eval.probe import extract_block_features, extract_features, probe_blocks, probe_with_config
from vim_core.eval.sampling_search import search_sampling
from vim_core.eval.ssim import ssim
from vim_core.io import spec_hash
from vim_core.tokenizer.export import Tokenizer, load_tokenizer
from vim_core.tokenizer.metrics import codebook_usage, psnr
from vim_core.train.tracking import save_image
from vim_core.transformer.export import load_transformer
from vim_core.transformer.gpt import VIM
from vim_core.transformer.sampling import sample, select_by_score

log = logging.getLogger(__name__)


def eval_config_spec(params: Params) -> dict:
    """What decides what an eval metric means: the eval and sampling settings (not where files live) and
    the version of the test data."""
    evaluate = params.evaluate.model_dump(mode="json", exclude={"classifier_dir", "weights_dir"})
    if evaluate["sampling_search"] is None:  # as before the search existed, so older hashes still match
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


def _classifier(
    params: Params, train: tuple, test: tuple, num_classes: int, timings: dict
) -> tuple[str, dict]:
    """Train (or reuse, when data and settings match) the domain classifier; returns its path and report."""
    e = params.evaluate
    path = Path(e.classifier_dir) / "classifier.safetensors"
    key = {
        "data": read_manifest(params.data.out_dir).get("version"),
        "config": e.classifier.model_dump(),
        "seed": e.seed,
    }
    if path.exists():
        _, extra = load_classifier(str(path))
        if extra.get("key") == key:
            return str(path), extra["report"]
    t = time.monotonic()
    model, report = train_classifier(
        *train,
        *test,
        num_classes=num_classes,
        epochs=e.classifier.epochs,
        batch_size=e.classifier.batch_size,
        lr=e.classifier.lr,
        seed=e.seed,
    )
    timings["classifier"] = round(time.monotonic() - t, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, str(path), extra={"key": key, "report": report})
    return str(path), report


def _balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def evaluate(params: Params, plots_dir: str | Path = "plots") -> dict:
    """Compute eval.json's content. Reads the prepared data, the tokenizer and the Transformer."""
    e = params.evaluate
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    started = time.monotonic()
    torch.manual_seed(e.seed)
    train_x, train_y = load_split(params.data.out_dir, "train")
    test_x, test_y = load_split(params.data.out_dir, "test")
    manifest = read_manifest(params.data.out_dir)
    num_classes = manifest["num_classes"]
    tokenizer = load_tokenizer(str(Path(params.tokenizer.out_dir) / "tokenizer.safetensors")).eval()
    vim, _ = load_transformer(str(Path(params.transformer.out_dir) / "transformer.safetensors"))

    clf_path, clf_report = _classifier(params, (train_x, train_y), (test_x, test_y), num_classes, timings)
    clf, _ = load_classifier(clf_path)
    n_ref = len(test_x)
    domain = {
        "extractor": "vim-domain classifier (penultimate features for FID/KID, logits for IS)",
        "classifier": clf_path,
        "classifier_test_accuracy": clf_report["test_accuracy"],
        "reference": f"test split ({n_ref} images)",
        "kid_subset_size": e.kid_subset_size,
        "seed": e.seed,
    }
    out: dict = {"definitions": {"domain_metrics": domain}}

    def dm(images: np.ndarray, reference: np.ndarray) -> dict:
        result = fidelity.domain_metrics(
            images, reference, clf_path, kid_subset_size=e.kid_subset_size, seed=e.seed
        )
        out["definitions"].setdefault("torch_fidelity", result.pop("definition"))
        return {k: round(v, 5) for k, v in result.items()}

    # Generation: 2N balanced candidates; the first N are the plain samples, the top half per class the
    # rejection-sampled ones, so both sets hold N images and their FIDs compare at the same sample count.
    n = e.num_samples
    s = params.transformer.sampling
    cfg_scale = e.cfg_scale if e.cfg_scale is not None else s.cfg_scale
    temperature = s.temperature
    floor_rows = np.random.default_rng(e.seed).permutation(len(train_x))
    if e.sampling_search is not None:
        # The last rows of the floor's permutation: disjoint from its first k whenever the split allows.
        reference = train_x[floor_rows[-e.sampling_search.reference_images :]]
        search = search_sampling(
            e.sampling_search,
            vim,
            tokenizer,
            clf_path,
            reference,
            num_classes,
            seed=e.seed + 1,
            top_k=s.top_k,
            top_p=s.top_p,
            batch_size=s.batch_size,
            kid_subset_size=e.kid_subset_size,
        )
        cfg_scale, temperature = search["cfg_scale"], search["temperature"]
        timings["sampling_search"] = search.pop("seconds")
        out["definitions"]["sampling_search"] = search
    t = time.monotonic()
    conditional = vim.num_classes > 0
    labels = _balanced_labels(2 * n, num_classes) if conditional else None
    tokens = sample(
        vim,
        2 * n,
        labels,
        temperature=temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        cfg_scale=cfg_scale if conditional else 1.0,
        seed=e.seed,
        batch_size=s.batch_size,
    )
    images = tokenizer.decode_uint8(tokens)
    timings["sampling"] = round(time.monotonic() - t, 1)
    probs = predict_proba(clf, images)
    plain, plain_labels = images[:n], (labels[:n] if conditional else None)
    gen = {f"{k}": v for k, v in dm(plain, test_x).items()}
    if conditional:
        gen["class_accuracy"] = round(class_accuracy(clf, plain, plain_labels.numpy()), 4)
    out.update(gen)
    out["definitions"]["generation"] = {
        "samples": n,
        "classes": "balanced, class = index mod num_classes" if conditional else "unconditional",
        "temperature": temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "cfg_scale": cfg_scale,
        "settings": "picked on train images (definitions.sampling_search)"
        if e.sampling_search is not None
        else "fixed in params",
        "seed": e.seed,
        "class_accuracy": "domain classifier's argmax equals the requested class",
    }

    from vim_core.config.transformer import RejectionConfig

    scores = probs[torch.arange(2 * n), labels] if conditional else probs.max(1).values
    keep = select_by_score(
        scores, labels, RejectionConfig(mode="acceptance_rate", acceptance_rate=e.acceptance_rate)
    )
    kept = images[keep.numpy()]
    rej = dm(kept, test_x)
    out.update({f"{k}_rejection": v for k, v in rej.items()})
    if conditional:
        out["class_accuracy_rejection"] = round(class_accuracy(clf, kept, labels[keep].numpy()), 4)
    out["definitions"]["rejection"] = {
        "candidates": 2 * n,
        "kept": int(keep.sum()),
        "acceptance_rate": e.acceptance_rate,
        "score": "domain classifier's probability of the requested class; top fraction kept per class",
    }

    # Floor and ceiling on the same pipeline.
    k = min(n, len(train_x))
    out["fid_domain_real"] = dm(train_x[floor_rows[:k]], test_x)["fid_domain"]
    out["fid_domain_unigram"] = dm(_unigram_images(params, tokenizer, n, e.seed), test_x)["fid_domain"]
    out["definitions"]["baselines"] = {
        "fid_domain_real": f"{k} train images vs the test split (floor)",
        "fid_domain_unigram": f"{n} images decoded from tokens drawn i.i.d. from the train split's token "
        "frequencies (ceiling)",
    }

    # Reconstruction.
    t = time.monotonic()
    test_tokens = tokenizer.encode_uint8(test_x)
    recon = tokenizer.decode_uint8(test_tokens)
    out["rfid_domain"] = dm(recon, test_x)["fid_domain"]
    x01 = torch.from_numpy(test_x).float() / 255
    r01 = torch.from_numpy(recon).float() / 255
    out["psnr"] = round(float(psnr(r01, x01)), 3)
    out["ssim"] = round(ssim(recon, test_x), 4)
    out["codebook_usage"] = round(codebook_usage(test_tokens, tokenizer.codebook_size, 256), 4)
    out["definitions"]["reconstruction"] = {
        "images": n_ref,
        "rfid_domain": "reconstructions vs originals of the test split, domain extractor",
        "codebook_usage": "fraction of codes used per batch of 256 test images, averaged over full batches",
        "psnr": "per image on [0, 1] pixels, averaged",
        "ssim": "Gaussian window 11, sigma 1.5, averaged",
    }
    timings["reconstruction"] = round(time.monotonic() - t, 1)

    # Linear probe, beside two baselines on the same split.
    t = time.monotonic()
    out.update(_probe(params, vim, tokenizer, train_x, train_y, test_x, test_y, test_tokens, num_classes))
    timings["probe"] = round(time.monotonic() - t, 1)

    # Unconditional generation (the paper reports it too): a conditional VIM samples p(x) through its
    # null class, without guidance; an unconditional VIM's plain samples already are.
    t = time.monotonic()
    if conditional:
        uncond = tokenizer.decode_uint8(
            sample(
                vim,
                n,
                None,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                cfg_scale=1.0,
                seed=e.seed,
                batch_size=s.batch_size,
            ),
        )
        out.update({f"{k}_uncond": v for k, v in dm(uncond, test_x).items()})
        how = "null class, no guidance"
    else:
        uncond = plain
        out.update({f"{k}_uncond": v for k, v in gen.items()})
        how = "the model is unconditional: the same samples as fid_domain"
    out["definitions"]["generation_uncond"] = {"samples": n, "how": how, "seed": e.seed}
    save_image(image_grid(uncond[:64]), plots / "samples_uncond.png")
    timings["unconditional"] = round(time.monotonic() - t, 1)

    # Inception metrics when the weights are present.
    incep = fidelity.inception_metrics(
        plain, test_x, e.weights_dir, kid_subset_size=e.kid_subset_size, seed=e.seed
    )
    if "definition" in incep:
        out["definitions"]["inception"] = incep.pop("definition")
    if "skipped" in incep:
        out["definitions"]["inception"] = {"skipped": incep.pop("skipped")}
    out.update(incep)

    _grids(plots, images, labels if conditional else probs.argmax(1), scores, test_x, recon, num_classes)
    timings["total"] = round(time.monotonic() - started, 1)
    out["timings_seconds"] = timings
    out["eval_config_hash"] = eval_config_hash(params)
    return out


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
    params: Params,
    vim: VIM,
    tokenizer: Tokenizer,
    train_x,
    train_y,
    test_x,
    test_y,
    test_tokens,
    num_classes: int,
) -> dict:
    p = params.transformer.probe
    limit = params.evaluate.max_probe_train or len(train_x)
    idx = np.random.default_rng(params.evaluate.seed).permutation(len(train_x))[:limit]
    tr_x, tr_y = train_x[idx], train_y[idx]
    tr_tokens = tokenizer.encode_uint8(tr_x)
    seed = params.evaluate.seed
    # Every block is probed (the curve over depth); the held-out train rows alone pick the block.
    curve = probe_blocks(
        p,
        extract_block_features(vim, tr_tokens),
        tr_y,
        extract_block_features(vim, test_tokens),
        test_y,
        num_classes,
        seed,
    )
    block = curve["block"]
    chosen: dict[str, float] = {"vim": curve["weight_decay"]}

    def probe(name: str, train_feats, test_feats) -> float:
        res = probe_with_config(p, train_feats, tr_y, test_feats, test_y, num_classes, seed)
        chosen[name] = res["weight_decay"]
        return round(res["accuracy"], 4)

    torch.manual_seed(seed)
    random_vim = VIM.from_spec(vim.spec()).eval()
    out = {
        "probe_accuracy": round(curve["accuracy"], 4),
        "probe_block": block,
        "probe_test_accuracy_by_block": dict(enumerate(curve["test_accuracy_by_block"])),
        "probe_val_accuracy_by_block": dict(enumerate(curve["val_accuracy_by_block"])),
        "probe_accuracy_pixels": probe(
            "pixels",
            tr_x.reshape(len(tr_x), -1).astype(np.float32),
            test_x.reshape(len(test_x), -1).astype(np.float32),
        ),
        "probe_accuracy_random_init": probe(
            "random_init",
            extract_features(random_vim, tr_tokens, block=block),
            extract_features(random_vim, test_tokens, block=block),
        ),
    }
    out["probe_definition"] = (
        f"softmax linear classifier (L-BFGS, {p.epochs} iterations, standardised features) on the average-"
        f"pooled, layer-normalised output of each of the {vim.cfg.layers} blocks; block indices are 0-based "
        f"(block 0 is the first Transformer block); probe_block = {block}, {curve['selection']}; "
        f"{len(tr_x)} train images, the whole test split; weight decay picked per feature set from "
        f"{p.weight_decays} on {p.val_fraction:.0%} of the train images (chosen: {chosen}); the pixel and "
        "random-init baselines use the same split, the random-init VIM the chosen block"
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
