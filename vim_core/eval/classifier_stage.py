"""The train_classifier stage's work: the domain classifier and the rejection scorer, chosen on val.

Kept apart from evaluate so that DVC trains them once per dataset and classifier settings: a change to
the tokenizer, the VIM or the top-level seed reuses them (from the workspace or DVC's run cache).
The weight decay is picked by val-split accuracy; the test split is only scored, after the choice.
"""

import json
import time
from pathlib import Path

from vim_core.config.pipeline import ClassifierConfig
from vim_core.data.shards import load_split, read_manifest
from vim_core.errors import VimError
from vim_core.eval.classifier import class_accuracy, load_classifier, save_classifier, train_classifier
from vim_core.io import atomic_dir
from vim_core.progress import Progress

CLASSIFIER = "classifier.safetensors"  # FID/KID features, IS logits, class accuracy
SCORER = "scorer.safetensors"  # rejection-sampling scores only


def fit_classifiers(cfg: ClassifierConfig, data_root: str | Path, out_dir: str | Path) -> dict:
    """Train both classifiers on the train split and write them to out_dir atomically; returns the report."""
    started = time.monotonic()
    manifest = read_manifest(data_root)
    if manifest["splits"].get("val", {}).get("count", 0) == 0:
        raise VimError(
            f"{data_root}: no val split to choose the classifier's weight decay on (data.val_fraction)"
        )
    train, val, test = (load_split(data_root, s) for s in ("train", "val", "test"))
    num_classes = manifest["num_classes"]
    lines = Progress("train_classifier", len(cfg.weight_decays) + 1, unit="fit")  # + the scorer

    def fit(wd: float, seed: int, width: int):
        model, report = train_classifier(
            *train,
            *val,
            num_classes=num_classes,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=wd,
            seed=seed,
            width=width,
        )
        lines.update(1, val_accuracy=round(report["test_accuracy"], 4))
        return model, report

    fits = {wd: fit(wd, cfg.seed, cfg.width) for wd in cfg.weight_decays}
    by_wd = {repr(wd): round(report["test_accuracy"], 4) for wd, (_, report) in fits.items()}  # on val
    best = max(fits, key=lambda wd: (fits[wd][1]["test_accuracy"], wd))  # ties: the stronger decay
    model, report = fits[best]
    scorer, scorer_report = fit(best, cfg.scorer_seed, cfg.scorer_width)
    common = {"data_version": manifest.get("version"), "num_classes": num_classes}
    out = {
        "classifier_val_accuracy": round(report["test_accuracy"], 4),
        "classifier_test_accuracy": round(class_accuracy(model, *test), 4),
        "classifier_weight_decay": best,
        "scorer_val_accuracy": round(scorer_report["test_accuracy"], 4),
        "scorer_test_accuracy": round(class_accuracy(scorer, *test), 4),
        "train_seconds": round(time.monotonic() - started, 1),
        "definitions": {
            "classifier": f"width {cfg.width}, seed {cfg.seed}: FID/KID features, IS logits, class accuracy",
            "scorer": f"width {cfg.scorer_width}, seed {cfg.scorer_seed}: rejection-sampling scores only",
            "weight_decay": f"picked from {cfg.weight_decays} by val accuracy {by_wd} (the test split "
            "is scored after the choice, never used for it); the scorer reuses it",
            "train_images": len(train[0]),
            "val_images": len(val[0]),
            "test_images": len(test[0]),
        },
    }
    roles = (
        (CLASSIFIER, model, report, out["classifier_test_accuracy"]),
        (SCORER, scorer, scorer_report, out["scorer_test_accuracy"]),
    )
    with atomic_dir(out_dir) as tmp:
        for name, m, r, test_accuracy in roles:
            # test_accuracy: what fidelity's definitions quote; scored after the choice
            extra = {**common, "test_accuracy": test_accuracy, "report": _fit_record(r, name)}
            save_classifier(m, str(tmp / name), extra=extra)
        kept = {k: v for k, v in out.items() if k != "train_seconds"}  # timing: the stage's metrics only
        (tmp / "report.json").write_text(json.dumps(kept, indent=2, sort_keys=True))
    return out


def _fit_record(report: dict, name: str) -> dict:
    """How a classifier was fitted, for its file's metadata: train_classifier scored it on the images it
    was given, here the val split, so its accuracy and image count are named val_*. Wall times stay out
    of models/classifier (the stage's metrics JSON has them), so the same data and settings write the
    same bytes: DVC's hash of the output and the classifier_sha256 that evaluate quotes repeat."""
    record = {k: v for k, v in report.items() if k not in ("test_accuracy", "test_images", "train_seconds")}
    record.update(val_accuracy=report["test_accuracy"], val_images=report["test_images"])
    return record | {"role": name.split(".")[0]}


def load_trained(out_dir: str | Path, data_root: str | Path) -> tuple[str, str, dict]:
    """(classifier path, scorer path, the stage's report); one line if they are missing or for other data."""
    out_dir = Path(out_dir)
    paths = out_dir / CLASSIFIER, out_dir / SCORER
    if not all(p.is_file() for p in paths):
        raise VimError(f"{out_dir}: no trained classifiers; run the train_classifier stage first")
    version = read_manifest(data_root).get("version")
    for p in paths:
        trained_on = load_classifier(str(p))[1].get("data_version")
        if trained_on != version:
            raise VimError(f"{p}: trained on data {trained_on}, not {version}; rerun train_classifier")
    report = json.loads((out_dir / "report.json").read_text())
    return str(paths[0]), str(paths[1]), report
