"""The sampling half of evaluate: settings chosen on val, then samples scored on test.

Split apart from report.py so that `evaluate.sampling: false` skips exactly this: the search, the
samples' FID/KID/IS, class accuracy, rejection and unconditional samples.
"""

import time
from collections.abc import Callable

import numpy as np
import torch

from vim_core.config import Params
from vim_core.config.transformer import RejectionConfig
from vim_core.eval import fidelity
from vim_core.eval.classifier import class_accuracy, load_classifier, predict_proba
from vim_core.eval.sampling_search import search_sampling
from vim_core.progress import phase
from vim_core.tokenizer.export import Tokenizer
from vim_core.transformer.gpt import VIM
from vim_core.transformer.sampling import sample, select_by_score

# eval.json's flat keys of the choice (the study report and promotion read them); None where unused
CHOICE_KEYS = (
    "fid_domain_val",
    "class_accuracy_val",
    "fid_domain_uncond_val",
    "chosen_cfg_scale",
    "chosen_temperature",
    "chosen_top_k",
    "chosen_top_p",
    "chosen_temperature_uncond",
    "chosen_top_k_uncond",
    "chosen_top_p_uncond",
)


def _settings(params: Params, search: dict | None, conditional: bool) -> tuple[dict, dict, dict]:
    """(conditional setting, unconditional setting, the flat choice keys)."""
    e, s = params.evaluate, params.transformer.sampling
    fixed = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}
    cond = {"cfg_scale": e.cfg_scale if e.cfg_scale is not None else s.cfg_scale, **fixed}
    uncond = {"cfg_scale": 1.0, **fixed}
    val = {"fid_domain_val": None, "class_accuracy_val": None, "fid_domain_uncond_val": None}
    if search is not None:
        u = search["unconditional"]
        uncond = {k: u[k] for k in ("cfg_scale", "temperature", "top_k", "top_p")}
        val["fid_domain_uncond_val"] = u["fid_domain_val"]
        if conditional:
            c = search["conditional"]
            cond = {k: c[k] for k in ("cfg_scale", "temperature", "top_k", "top_p")}
            val.update(fid_domain_val=c["fid_domain_val"], class_accuracy_val=c["class_accuracy_val"])
        else:
            val["fid_domain_val"] = u["fid_domain_val"]
    plain = cond if conditional else uncond  # an unconditional VIM's plain samples are unconditional
    keys = {
        **val,
        "chosen_cfg_scale": cond["cfg_scale"] if conditional else None,
        "chosen_temperature": plain["temperature"],
        "chosen_top_k": plain["top_k"],
        "chosen_top_p": plain["top_p"],
        "chosen_temperature_uncond": uncond["temperature"],
        "chosen_top_k_uncond": uncond["top_k"],
        "chosen_top_p_uncond": uncond["top_p"],
    }
    return plain, uncond, keys


def generation_metrics(
    params: Params,
    vim: VIM,
    tokenizer: Tokenizer,
    paths: tuple[str, str],
    val_x: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    seed: int,
    dm: Callable[[np.ndarray, np.ndarray], dict],
    timings: dict,
    uncond_vim: VIM | None = None,
) -> tuple[dict, dict, dict]:
    """(flat metrics, definitions, what the grids need). `paths`: (classifier, rejection scorer);
    `uncond_vim`: the unconditional copy (transformer.uncond) that draws the unconditional samples."""
    e, s = params.evaluate, params.transformer.sampling
    clf_path, scorer_path = paths
    clf, _ = load_classifier(clf_path)
    conditional = vim.num_classes > 0
    out, defs = {}, {}
    search = None
    if e.sampling_search is not None:
        phase("evaluate", "sampling_search", "settings chosen on the val split")
        rows = np.random.default_rng(seed).permutation(len(val_x))[: e.sampling_search.reference_images]
        search = search_sampling(
            e.sampling_search,
            vim,
            tokenizer,
            clf_path,
            val_x[np.sort(rows)],
            num_classes,
            seed=seed + 1,  # not the reported samples' own draws
            batch_size=s.batch_size,
            kid_subset_size=e.kid_subset_size,
            uncond_vim=uncond_vim,
        )
        timings["sampling_search"] = search.pop("seconds")
        defs["sampling_search"] = search
    plain_setting, uncond_setting, choice = _settings(params, search, conditional)
    out.update(choice)

    # 2N balanced candidates; the first N are the plain samples, the top half per class the
    # rejection-sampled ones, so both sets hold N images and their FIDs compare at the same sample count.
    n = e.num_samples
    phase("evaluate", "sampling", f"{2 * n} candidates, rejection keeps {n}")
    t = time.monotonic()
    labels = torch.arange(2 * n) % num_classes if conditional else None
    tokens = sample(vim, 2 * n, labels, seed=seed, batch_size=s.batch_size, **plain_setting)
    images = tokenizer.decode_uint8(tokens)
    timings["sampling"] = round(time.monotonic() - t, 1)
    plain = images[:n]
    gen = dm(plain, test_x)
    if conditional:
        gen["class_accuracy"] = round(class_accuracy(clf, plain, labels[:n].numpy()), 4)
    out.update(gen)
    chosen_on = "chosen on the val split (definitions.sampling_search)" if search else "fixed in params"
    defs["generation"] = {
        "samples": n,
        "classes": "balanced, class = index mod num_classes" if conditional else "unconditional",
        **plain_setting,
        "settings": chosen_on,
        "seed": seed,
        "split": "test: fid_domain, kid_domain, isc_domain, class_accuracy; val: fid_domain_val, "
        "class_accuracy_val (the chosen candidate's own search draws)",
        "class_accuracy": "the domain classifier's argmax equals the requested class",
    }

    # Rejection, scored by the independent scorer (another seed and width); the classifier still
    # defines FID/KID/IS and class accuracy, so rejection does not grade its own exam.
    scorer, _ = load_classifier(scorer_path)
    probs = predict_proba(scorer, images)
    scores = probs[torch.arange(2 * n), labels] if conditional else probs.max(1).values
    rule = RejectionConfig(mode="acceptance_rate", acceptance_rate=e.acceptance_rate)
    keep = select_by_score(scores, labels, rule)
    kept = images[keep.numpy()]
    out.update({f"{k}_rejection": v for k, v in dm(kept, test_x).items()})
    if conditional:
        out["class_accuracy_rejection"] = round(class_accuracy(clf, kept, labels[keep].numpy()), 4)
    defs["rejection"] = {
        "candidates": 2 * n,
        "kept": int(keep.sum()),
        "acceptance_rate": e.acceptance_rate,
        "score": "the rejection scorer's probability of the requested class (its max class probability "
        "for an unconditional model); top fraction kept per class",
        "scorer": scorer_path,
        "split": "test",
    }

    # Unconditional generation (the paper reports it too): from the unconditional copy when there is one,
    # else a conditional VIM samples p(x) through its null class, without guidance; an unconditional
    # VIM's plain samples already are.
    phase("evaluate", "unconditional", f"{n} samples")
    t = time.monotonic()
    if conditional:
        draws = sample(uncond_vim or vim, n, None, seed=seed, batch_size=s.batch_size, **uncond_setting)
        uncond = tokenizer.decode_uint8(draws)
        out.update({f"{k}_uncond": v for k, v in dm(uncond, test_x).items()})
        how = (
            "the unconditional copy of the class-conditional VIM (transformer.uncond), no guidance"
            if uncond_vim is not None
            else "null class, no guidance"
        )
    else:
        uncond = plain
        out.update({f"{k}_uncond": v for k, v in gen.items()})
        how = "the model is unconditional: the same samples as fid_domain"
    defs["generation_uncond"] = {
        "samples": n,
        "how": how,
        **uncond_setting,
        "settings": chosen_on,
        "seed": seed,
        "split": "test; fid_domain_uncond_val: val",
    }
    timings["unconditional"] = round(time.monotonic() - t, 1)

    incep = fidelity.inception_metrics(
        plain, test_x, e.weights_dir, kid_subset_size=e.kid_subset_size, seed=seed
    )
    if "definition" in incep:
        defs["inception"] = incep.pop("definition")
    if "skipped" in incep:
        defs["inception"] = {"skipped": incep.pop("skipped")}
    out.update(incep)
    grid_labels = labels if conditional else predict_proba(clf, images).argmax(1)
    return out, defs, {"images": images, "labels": grid_labels, "scores": scores, "uncond": uncond}
