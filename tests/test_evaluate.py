"""The evaluate step end to end on a micro pipeline over real MNIST digits."""

import hashlib
import json

import pytest
from PIL import Image

from tests.test_transformer_stage import stage2_params
from vim_core.config import apply_overrides, parse_params
from vim_core.data.prepare import prepare
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
        "classifier": {"epochs": 1},
        "classifier_dir": str(stage2 / "classifier"),
        "weights_dir": str(stage2 / "no-weights-here"),
    }
    params = parse_params(raw)
    train_transformer(params.transformer, seed=0)
    return params


def test_evaluate_reports_every_metric_with_its_definition(eval_params, tmp_path):
    out = evaluate(eval_params, plots_dir=tmp_path)
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
    assert (
        out["fid_inception"] is None
        and "weights-inception-2015-12-05-6726825d.pth" in d["inception"]["skipped"]
    )
    for name in ("samples_per_class.png", "reconstructions.png", "rejection_rejected_vs_accepted.png"):
        assert Image.open(tmp_path / name).size[0] > 32
    json.dumps(out)  # eval.json must serialise


def test_classifier_is_reused_when_nothing_changed(eval_params, tmp_path):
    first = evaluate(eval_params, plots_dir=tmp_path)
    second = evaluate(eval_params, plots_dir=tmp_path)
    assert "classifier" not in second["timings_seconds"]
    assert second["fid_domain"] == first["fid_domain"]  # same seed, same models: the same numbers


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
    """The search scores candidates against train images: temperature 50 (token soup) must lose to 1."""
    from pathlib import Path

    from vim_core.config.pipeline import SamplingSearchConfig
    from vim_core.data.shards import load_split
    from vim_core.eval.classifier import save_classifier, train_classifier
    from vim_core.eval.sampling_search import search_sampling
    from vim_core.tokenizer.export import load_tokenizer
    from vim_core.transformer.export import load_transformer

    train_x, train_y = load_split(eval_params.data.out_dir, "train")
    test_x, test_y = load_split(eval_params.data.out_dir, "test")
    tokenizer = load_tokenizer(str(Path(eval_params.tokenizer.out_dir) / "tokenizer.safetensors"))
    vim, _ = load_transformer(str(Path(eval_params.transformer.out_dir) / "transformer.safetensors"))
    clf = tmp_path / "classifier.safetensors"
    save_classifier(train_classifier(train_x, train_y, test_x, test_y, epochs=1, num_classes=10)[0], str(clf))
    cfg = SamplingSearchConfig(cfg_scales=[1.0], temperatures=[50.0, 1.0], samples=30, reference_images=40)
    out = search_sampling(cfg, vim, tokenizer, str(clf), train_x[:40], 10, seed=3, kid_subset_size=20)
    fids = {row["temperature"]: row["fid_domain"] for row in out["grid"]}
    assert set(fids) == {1.0, 50.0} and fids[1.0] < fids[50.0]
    assert (out["cfg_scale"], out["temperature"]) == (1.0, 1.0)
    # A class-accuracy floor no candidate reaches: the most class-faithful one is picked instead.
    strict = cfg.model_copy(update={"min_class_accuracy": 1.0, "temperatures": [50.0, 1.0, 0.5]})
    guarded = search_sampling(strict, vim, tokenizer, str(clf), train_x[:40], 10, seed=3, kid_subset_size=20)
    most_accurate = max(guarded["grid"], key=lambda r: r["class_accuracy"])
    if most_accurate["class_accuracy"] < 1.0:
        assert guarded["temperature"] == most_accurate["temperature"]
    assert "class_accuracy >= 1.0" in guarded["rule"]


def test_evaluate_samples_at_the_setting_the_search_picked(eval_params, tmp_path):
    raw = eval_params.model_dump(mode="json")
    raw["evaluate"]["sampling_search"] = {
        "cfg_scales": [1.0, 3.0],
        "temperatures": [1.0],
        "samples": 20,
        "reference_images": 30,
    }
    out = evaluate(parse_params(raw), plots_dir=tmp_path)
    search = out["definitions"]["sampling_search"]
    best = min(search["grid"], key=lambda r: r["fid_domain"])
    assert len(search["grid"]) == 2 and "30 train images" in search["reference"]
    assert all(0 <= row["class_accuracy"] <= 1 for row in search["grid"])
    assert out["definitions"]["generation"]["cfg_scale"] == best["cfg_scale"] == search["cfg_scale"]
    assert out["timings_seconds"]["sampling_search"] > 0
    assert eval_config_hash(parse_params(raw)) != eval_config_hash(eval_params)
