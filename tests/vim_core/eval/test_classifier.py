"""The domain classifier: accuracy on the embedded MNIST split, probabilities, and its safetensors file."""

import logging

import numpy as np
import pytest
import safetensors.torch
import torch

from vim_core.errors import VimError
from vim_core.eval.classifier import (
    DomainClassifier,
    class_accuracy,
    load_classifier,
    predict_proba,
    save_classifier,
    train_classifier,
)


@pytest.fixture(scope="module")
def trained(mnist_splits):
    (x, y), (xt, yt) = mnist_splits
    return train_classifier(x, y, xt, yt, seed=0)


def test_reaches_098_on_embedded_test_split(trained, mnist_splits):
    model, report = trained
    (_, _), (xt, yt) = mnist_splits
    print(f"domain classifier: {report}")
    assert report["test_accuracy"] >= 0.98
    # the train split less the val split (data.val_fraction 0.1); the test split is as before
    assert report["train_images"] == len(mnist_splits[0][0]) < 8200 and report["test_images"] == 979
    assert class_accuracy(model, xt, yt) == pytest.approx(report["test_accuracy"])
    # Against a label permutation it must be near chance: the accuracy is about the labels, not the images.
    assert class_accuracy(model, xt, (yt + 1) % 10) < 0.05


def test_predict_proba_is_a_distribution(trained, mnist_splits):
    model, _ = trained
    (_, _), (xt, _) = mnist_splits
    p = predict_proba(model, xt[:300], batch_size=64)
    assert p.shape == (300, 10) and p.dtype == torch.float32
    assert torch.allclose(p.sum(1), torch.ones(300), atol=1e-5)
    assert (p >= 0).all()
    # Batching must not change the answer (eval mode: BatchNorm uses running statistics).
    assert torch.allclose(p, predict_proba(model, xt[:300], batch_size=300), atol=1e-5)
    assert model.training is False
    with pytest.raises(TypeError, match="uint8"):
        predict_proba(model, xt[:4].astype(np.float32))


def test_save_load_round_trip(trained, mnist_splits, tmp_path):
    model, report = trained
    (_, _), (xt, _) = mnist_splits
    path = str(tmp_path / "classifier.safetensors")
    save_classifier(
        model, path, {"test_accuracy": report["test_accuracy"], "class_names": list("0123456789")}
    )
    loaded, extra = load_classifier(path)
    assert loaded.spec == model.spec
    assert extra["test_accuracy"] == report["test_accuracy"] and extra["class_names"][3] == "3"
    assert torch.equal(predict_proba(loaded, xt[:64]), predict_proba(model, xt[:64]))


def test_load_refuses_other_files(tmp_path):
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(
        {"w": torch.zeros(2)}, str(other), metadata={"format": "vit-vqgan", "config": "{}"}
    )
    with pytest.raises(VimError, match="not a domain classifier file"):
        load_classifier(str(other))
    truncated = tmp_path / "cut.safetensors"
    save_classifier(DomainClassifier(1, 32, 10), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(VimError, match="truncated"):
        load_classifier(str(truncated))
    with pytest.raises(VimError, match="not found"):
        load_classifier(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("channels,size", [(3, 64), (1, 28), (3, 256)])
def test_architecture_follows_image_size(channels, size):
    model = DomainClassifier(channels, size, num_classes=7).eval()
    x = torch.zeros(2, channels, size, size)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, 128)
    pools = sum(isinstance(m, torch.nn.MaxPool2d) for m in model.convs)
    assert size // 2**pools <= 4 < size // 2 ** (pools - 1)  # halved just far enough to reach 4x4


def test_the_stage_trains_two_classifiers_and_picks_wd_on_val(tmp_path, caplog, monkeypatch):
    """train_classifier's work: the weight decay by val accuracy, an independent scorer, one-line errors."""
    from vim_core.config import DataConfig
    from vim_core.config.pipeline import ClassifierConfig
    from vim_core.data.prepare import prepare
    from vim_core.eval.classifier_stage import fit_classifiers, load_trained

    data = DataConfig(out_dir=str(tmp_path / "data"), max_images=800)
    prepare(data)
    cfg = ClassifierConfig(epochs=1, weight_decays=[0.0, 0.5])
    monkeypatch.setenv("VIM_PROGRESS_EVERY", "0")
    caplog.set_level(logging.DEBUG, logger="vim.progress")
    report = fit_classifiers(cfg, data.out_dir, tmp_path / "clf")
    fits = [r.getMessage() for r in caplog.records if r.name == "vim.progress"]
    assert [m.split(",")[0] for m in fits] == [
        f"train_classifier: fit {i}/3 ({i / 3:.0%})" for i in (1, 2, 3)
    ]
    assert "val_accuracy" in fits[0] and "s/fit, ETA" in fits[0] and "done in" in fits[-1]
    assert (
        report["classifier_weight_decay"] in (0.0, 0.5)
        and "by val accuracy" in report["definitions"]["weight_decay"]
    )
    clf_path, scorer_path, again = load_trained(tmp_path / "clf", data.out_dir)
    clf, scorer = load_classifier(clf_path)[0], load_classifier(scorer_path)[0]
    assert (clf.spec["width"], scorer.spec["width"]) == (32, 48)
    assert again == {k: v for k, v in report.items() if k != "train_seconds"} and report["train_seconds"] > 0
    fitted = load_classifier(scorer_path)[1]["report"]
    assert fitted["seed"] == 1 and fitted["val_images"] == report["definitions"]["val_images"]
    assert round(fitted["val_accuracy"], 4) == report["scorer_val_accuracy"]
    assert not {"test_accuracy", "test_images", "train_seconds"} & set(fitted)  # it never saw test
    # The same data and settings write the same bytes: DVC's output hash and classifier_sha256 repeat.
    fit_classifiers(cfg, data.out_dir, tmp_path / "again")
    for name in ("classifier.safetensors", "scorer.safetensors", "report.json"):
        assert (tmp_path / "clf" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    prepare(data.model_copy(update={"max_images": 700}))  # other data: the classifiers no longer apply
    with pytest.raises(VimError, match="trained on data .*rerun train_classifier"):
        load_trained(tmp_path / "clf", data.out_dir)
    with pytest.raises(ValueError, match="own scorer_seed and scorer_width"):
        ClassifierConfig(scorer_seed=0)
