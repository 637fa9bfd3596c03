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
    for change in ("evaluate.num_samples=41", "transformer.sampling.temperature=0.9", "evaluate.seed=3"):
        assert eval_config_hash(apply_overrides(params, [change])) != eval_config_hash(params), change
