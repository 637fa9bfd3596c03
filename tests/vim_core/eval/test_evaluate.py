"""The evaluate step end to end on a micro pipeline over real MNIST digits."""

import hashlib
import json
import logging
import re

import pytest
import torch
from PIL import Image

from tests.vim_core.transformer.test_transformer_stage import stage2_params
from vim_core.config import apply_overrides, parse_params
from vim_core.data.prepare import prepare
from vim_core.eval.classifier_stage import fit_classifiers
from vim_core.eval.generation import CHOICE_KEYS
from vim_core.eval.reconstruction import evaluate_tokenizer
from vim_core.eval.report import eval_config_hash, eval_config_spec, evaluate
from vim_core.io import spec_hash
from vim_core.train.transformer_trainer import train_transformer


@pytest.fixture(scope="module")
def eval_params(stage2):  # noqa: F811
    raw = stage2_params(stage2)
    raw["transformer"]["out_dir"] = str(stage2 / "vim_eval")
    raw["transformer"]["checkpoint_dir"] = str(stage2 / "vim_eval_ckpt")
    raw["transformer"]["probe"] = {"epochs": 20}
    raw["evaluate"] = {
        "num_samples": 40,
        "kid_subset_size": 20,
        "max_probe_train": 300,
        "seed": 1,
        "classifier": {"epochs": 1, "weight_decays": [0.0, 0.05]},
        "classifier_dir": str(stage2 / "classifier"),
        "weights_dir": str(stage2 / "no-weights-here"),
    }
    params = parse_params(raw)
    train_transformer(params.transformer, seed=0)
    fit_classifiers(params.evaluate.classifier, params.data.out_dir, params.evaluate.classifier_dir)
    return params


def test_evaluate_reports_every_metric_with_its_definition(eval_params, tmp_path):
    out = evaluate(eval_params, plots_dir=tmp_path)
    # The tokenizer-only step (stage evaluate_tokenizer) gives the same reconstruction rows.
    alone = evaluate_tokenizer(eval_params)
    for key in ("rfid_domain", "psnr", "ssim", "codebook_usage"):
        assert alone[key] == out[key], key
    assert alone["definitions"]["reconstruction"]["split"] == "test" and alone["rfid_domain"] > 0
    for key in (
        "fid_domain",
        "kid_domain",
        "isc_domain",
        "class_accuracy",
        "fid_domain_rejection",
        "class_accuracy_rejection",
        "fid_domain_real",
        "fid_domain_unigram",
        "rfid_domain",
        "psnr",
        "ssim",
        "codebook_usage",
        "probe_accuracy",
        "probe_accuracy_pixels",
        "probe_accuracy_random_init",
    ):
        assert key in out, key
    assert 0.0 <= out["class_accuracy"] <= 1.0 and 0.0 < out["ssim"] <= 1.0
    assert all(k in out for k in CHOICE_KEYS) and out["fid_domain_val"] is None  # no search: nothing chosen
    assert out["chosen_cfg_scale"] == eval_params.transformer.sampling.cfg_scale
    # The floor (real train images) must sit far below the ceiling (i.i.d. token soup).
    assert out["fid_domain_real"] < out["fid_domain_unigram"]
    assert out["probe_accuracy_pixels"] > 0.5  # raw pixels of real digits are linearly separable
    d = out["definitions"]
    assert (
        d["generation"]["samples"] == 40
        and d["rejection"]["kept"] == 40
        and d["rejection"]["candidates"] == 80
    )
    assert "vim-domain" in json.dumps(d["torch_fidelity"])
    assert d["torch_fidelity"]["classifier_test_accuracy"] == d["domain_metrics"]["classifier_test_accuracy"]
    assert d["rejection"]["scorer"].endswith("scorer.safetensors")  # not the classifier FID is built on
    assert d["domain_metrics"]["classifier"].endswith("classifier.safetensors")
    assert (
        out["fid_inception"] is None
        and "weights-inception-2015-12-05-6726825d.pth" in d["inception"]["skipped"]
    )
    for name in ("samples_per_class.png", "reconstructions.png", "rejection_rejected_vs_accepted.png"):
        assert Image.open(tmp_path / name).size[0] > 32
    json.dumps(out)  # eval.json must serialise


def test_evaluate_is_repeatable_and_follows_the_run_seed(eval_params, tmp_path):
    first = evaluate(eval_params, plots_dir=tmp_path)
    second = evaluate(eval_params, plots_dir=tmp_path)
    assert "classifier" not in second["timings_seconds"]  # the train_classifier stage trains it, not this
    assert second["fid_domain"] == first["fid_domain"]  # same seed, same models: the same numbers
    other = evaluate(apply_overrides(eval_params, ["seed=5"]), plots_dir=tmp_path)
    assert other["definitions"]["generation"]["seed"] == 6  # seed 5 + evaluate.seed 1
    assert other["fid_domain"] != first["fid_domain"]
    assert eval_config_hash(apply_overrides(eval_params, ["seed=5"])) == eval_config_hash(eval_params)


def test_evaluate_needs_the_trained_classifiers_and_a_val_split(eval_params, tmp_path):
    from vim_core.errors import VimError

    elsewhere = apply_overrides(eval_params, [f"evaluate.classifier_dir={tmp_path / 'none'}"])
    with pytest.raises(VimError, match="no trained classifiers; run the train_classifier stage first"):
        evaluate(elsewhere, plots_dir=tmp_path)
    no_val = apply_overrides(
        eval_params, [f"data.out_dir={tmp_path / 'no-val'}", "data.val_fraction=0", "data.max_images=200"]
    )
    prepare(no_val.data)
    with pytest.raises(VimError, match=r"no-val: no val split to make the evaluation's choices on"):
        evaluate(no_val, plots_dir=tmp_path)


def test_skip_switches_leave_out_their_metrics(eval_params, tmp_path):
    out = evaluate(
        apply_overrides(eval_params, ["evaluate.probes=false", "evaluate.sampling=false"]), tmp_path
    )
    assert not any(k.startswith("probe_accuracy") or k.startswith("fid_domain_rej") for k in out)
    assert "fid_domain" not in out and "class_accuracy" not in out and "chosen_cfg_scale" not in out
    assert out["probe_definition"].startswith("skipped") and "skipped" in out["definitions"]["generation"]
    assert out["psnr"] > 0 and out["fid_domain_real"] >= 0  # reconstruction and baselines still run
    assert (tmp_path / "samples_per_class.png").is_file()  # dvc.yaml's plots exist, blank


def test_spec_hash_ignores_key_order_and_keeps_the_recorded_form():
    assert spec_hash({"a": 1, "b": 2}) == spec_hash({"b": 2, "a": 1}) != spec_hash({"a": 2})
    spec = {"evaluate": {"seed": 0, "num_samples": 1000}, "test_data": "abc", "sampling": {"top_k": None}}
    # eval.json files and registry tags hold hashes of this form: it must not drift.
    assert spec_hash(spec) == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def test_eval_config_hash_changes_with_what_a_metric_means_only(tmp_path):
    raw = stage2_params(tmp_path)
    raw["data"]["max_images"] = 200
    params = parse_params(raw)
    prepare(params.data)
    spec = eval_config_spec(params)
    assert spec["test_data"] and eval_config_hash(params) == spec_hash(spec)
    moved = params.model_copy(deep=True)
    moved.evaluate.classifier_dir, moved.evaluate.weights_dir = "elsewhere", "s3://other/weights"
    assert eval_config_hash(moved) == eval_config_hash(params)  # where files live changes no metric
    changes = (
        "evaluate.num_samples=41",
        "transformer.sampling.temperature=0.9",
        "evaluate.seed=3",
        "evaluate.sampling_search={cfg_scales: [1.5, 2.0]}",
    )
    for change in changes:
        assert eval_config_hash(apply_overrides(params, [change])) != eval_config_hash(params), change
    # Without a search, the hash is the one recorded before the search existed (registry tags match).
    assert "sampling_search" not in spec["evaluate"]


def test_sampling_search_prefers_the_model_over_near_uniform_tokens(eval_params, tmp_path):
    """The search scores candidates against val images: temperature 50 (token soup) must lose to 1."""
    from pathlib import Path

    from vim_core.config.pipeline import SamplingSearchConfig
    from vim_core.data.shards import load_split
    from vim_core.eval.sampling_search import search_sampling
    from vim_core.tokenizer.export import load_tokenizer
    from vim_core.transformer.export import load_transformer

    val_x, _ = load_split(eval_params.data.out_dir, "val")
    tokenizer = load_tokenizer(str(Path(eval_params.tokenizer.out_dir) / "tokenizer.safetensors"))
    vim, _ = load_transformer(str(Path(eval_params.transformer.out_dir) / "transformer.safetensors"))
    clf = str(Path(eval_params.evaluate.classifier_dir) / "classifier.safetensors")
    cfg = SamplingSearchConfig(cfg_scales=[1.0], temperatures=[50.0, 1.0], samples=30, reference_images=40)
    out = search_sampling(cfg, vim, tokenizer, clf, val_x[:40], 10, seed=3, kid_subset_size=20)
    cond = out["conditional"]
    fids = {row["temperature"]: row["fid_domain"] for row in cond["grid"]}
    assert set(fids) == {1.0, 50.0} and fids[1.0] < fids[50.0]
    assert (cond["cfg_scale"], cond["temperature"]) == (1.0, 1.0)
    assert len(out["unconditional"]["grid"]) == 2 and out["unconditional"]["temperature"] == 1.0
    assert "val-split" in out["reference"]
    # A class-accuracy floor no candidate reaches: the most class-faithful one is picked instead.
    strict = cfg.model_copy(update={"min_class_accuracy": 1.0, "temperatures": [50.0, 1.0, 0.5]})
    guarded = search_sampling(strict, vim, tokenizer, clf, val_x[:40], 10, seed=3, kid_subset_size=20)
    most_accurate = max(guarded["conditional"]["grid"], key=lambda r: r["class_accuracy"])
    if most_accurate["class_accuracy"] < 1.0:
        assert guarded["conditional"]["temperature"] == most_accurate["temperature"]
    assert "class_accuracy >= 1.0" in guarded["conditional"]["rule"]


def test_evaluate_samples_at_the_setting_the_search_picked(eval_params, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("VIM_PROGRESS_EVERY", "0")  # a progress line at every unit
    caplog.set_level(logging.DEBUG, logger="vim.progress")
    raw = eval_params.model_dump(mode="json")
    raw["evaluate"]["sampling_search"] = {
        "cfg_scales": [1.0, 3.0],
        "temperatures": [0.9, 1.0],
        "top_ps": [None, 0.9],
        "samples": 20,
        "reference_images": 30,
    }
    out = evaluate(parse_params(raw), plots_dir=tmp_path)
    search = out["definitions"]["sampling_search"]
    cond, uncond = search["conditional"], search["unconditional"]
    # 2 scales at plain sampling, then the 3 other temperature x top-p settings at the scale picked
    assert (
        len(cond["grid"]) == 5 and len(uncond["grid"]) == 4 and "30 val-split images" in search["reference"]
    )
    assert all(0 <= row["class_accuracy"] <= 1 for row in cond["grid"])
    best = min(cond["grid"], key=lambda r: r["fid_domain"])
    gen = out["definitions"]["generation"]
    assert (gen["cfg_scale"], gen["temperature"], gen["top_p"]) == (
        best["cfg_scale"],
        best["temperature"],
        best["top_p"],
    )
    assert (out["chosen_cfg_scale"], out["chosen_temperature"], out["chosen_top_p"]) == (
        cond["cfg_scale"],
        cond["temperature"],
        cond["top_p"],
    )
    assert out["fid_domain_val"] == cond["fid_domain_val"] == best["fid_domain"]
    assert out["class_accuracy_val"] == best["class_accuracy"] and out["chosen_top_k"] is None
    ubest = min(uncond["grid"], key=lambda r: r["fid_domain"])
    assert (out["chosen_temperature_uncond"], out["chosen_top_p_uncond"]) == (
        ubest["temperature"],
        ubest["top_p"],
    )
    assert out["fid_domain_uncond_val"] == ubest["fid_domain"]
    assert out["timings_seconds"]["sampling_search"] > 0
    assert eval_config_hash(parse_params(raw)) != eval_config_hash(eval_params)

    # Progress in logs (docs/operations.md): each phase as it begins, and the long ones unit by unit
    lines = [r.getMessage() for r in caplog.records if r.name == "vim.progress"]
    phases = [m.split(" ")[2] for m in lines if m.startswith("evaluate: phase ")]
    assert phases == ["sampling_search", "sampling", "unconditional", "baselines", "reconstruction", "probe"]
    search = [m for m in lines if m.startswith("evaluate sampling_search: candidate ")]
    assert [m.split(" ")[3] for m in search] == [f"{i}/9" for i in range(1, 10)], search
    assert re.search(r", fid_domain [\d.]+, [\d.]+ s/candidate, done in \w+$", search[-1]), search[-1]
    blocks = (
        eval_params.transformer.resolved_model().layers + 2
    )  # every block, the pixels, the random-init VIM
    probe = [m for m in lines if m.startswith("evaluate probe: set ")]
    assert len(probe) == blocks and probe[-1].startswith(f"evaluate probe: set {blocks}/{blocks} (100%)")
    assert "features block 0" in probe[0] and "features random_init" in probe[-1]


def _with_noise_for_test_pixels(src, dst) -> None:
    """A copy of a prepared dataset whose test images are uniform noise; train and val shards untouched."""
    import shutil

    import numpy as np

    from vim_core.io import sha256_file

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    for shard in manifest["splits"]["test"]["shards"]:
        path = dst / shard["file"]
        with np.load(path) as npz:
            images, labels = npz["images"], npz["labels"]
        noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez(f, images=noise, labels=labels)
        shard["sha256"] = sha256_file(path)
    shas = [s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]]
    manifest["version"] = hashlib.sha256(json.dumps(shas).encode()).hexdigest()[:16]
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_swapping_the_test_pixels_moves_no_choice(eval_params, tmp_path):
    """Issue 23's acceptance: the sampling choice, the probe's block and weight decays and the classifiers
    depend on train and val only. Replace every test image by noise: no choice moves, the scores do."""
    from pathlib import Path

    import safetensors.torch

    original = Path(eval_params.data.out_dir)
    swapped = tmp_path / "swapped"
    _with_noise_for_test_pixels(original, swapped)
    search = {"cfg_scales": [1.0, 3.0], "temperatures": [0.7, 1.0], "top_ps": [None, 0.9], "samples": 20}

    def run(data_dir: Path, name: str) -> tuple[dict, dict, dict]:
        raw = eval_params.model_dump(mode="json")
        raw["data"]["out_dir"] = str(data_dir)
        raw["evaluate"].update(sampling_search={**search, "reference_images": 30})
        raw["evaluate"]["classifier_dir"] = str(tmp_path / name / "classifier")
        params = parse_params(raw)
        report = fit_classifiers(params.evaluate.classifier, data_dir, params.evaluate.classifier_dir)
        out = evaluate(params, plots_dir=tmp_path / name / "plots")
        weights = {
            f: safetensors.torch.load_file(Path(params.evaluate.classifier_dir) / f)
            for f in ("classifier.safetensors", "scorer.safetensors")
        }
        choice = {k: out[k] for k in CHOICE_KEYS}
        choice.update(
            search=out["definitions"]["sampling_search"],
            probe_block=out["probe_block"],
            probe_weight_decays=out["probe_weight_decays"],
            probe_val_accuracy_by_block=out["probe_val_accuracy_by_block"],
            classifier_weight_decay=report["classifier_weight_decay"],
            classifier_val_accuracy=report["classifier_val_accuracy"],
        )
        return choice, weights, out

    before, weights_before, scored_before = run(original, "original")
    after, weights_after, scored_after = run(swapped, "swapped")
    assert after == before
    for name, tensors in weights_before.items():
        assert tensors.keys() == weights_after[name].keys()
        assert all(torch.equal(t, weights_after[name][k]) for k, t in tensors.items()), name
    # the test split did change: what it scores moved
    assert scored_after["fid_domain"] != scored_before["fid_domain"]
    assert scored_after["probe_accuracy"] != scored_before["probe_accuracy"]


def test_the_served_defaults_are_the_settings_the_search_picked():
    from flows.publish import sampling_defaults
    from vim_core.config import Params

    params = apply_overrides(Params(), ["transformer.sampling.top_k=32"])
    picked = {"cfg_scale": 2.0, "temperature": 0.9, "top_k": None, "top_p": 0.95}
    served = sampling_defaults(params, picked)
    assert (served["cfg_scale"], served["temperature"], served["top_k"], served["top_p"]) == (
        2.0,
        0.9,
        0,
        0.95,
    )
    assert sampling_defaults(params)["top_k"] == 32  # no search: the params' own
