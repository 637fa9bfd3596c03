"""Does rejection sampling help FID_domain, and does the independent scorer change the answer?

A micro run of the pipeline's own code (params.yaml shrunk: 4000 images, a 300-step tokenizer without
the GAN, a 400-step VIM, no probes), then evaluate at two run seeds, each twice: rejection ranked by
the independent scorer (the pipeline's way) and by the FID classifier itself (the old way, which grades
its own exam). Prints one JSON object per seed; nothing is tuned.

    python -m benchmarks.rejection_scorer [--out DIR]
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import yaml

from vim_core.config import parse_params
from vim_core.data.prepare import prepare
from vim_core.eval.classifier_stage import CLASSIFIER, SCORER, fit_classifiers
from vim_core.eval.report import evaluate
from vim_core.tokenizer.encode_dataset import tokenize_dataset
from vim_core.train.tokenizer_trainer import train_tokenizer
from vim_core.train.transformer_trainer import train_transformer

KEYS = (
    "fid_domain",
    "fid_domain_rejection",
    "class_accuracy",
    "class_accuracy_rejection",
    "chosen_cfg_scale",
)


def micro_params(tmp: Path):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["data"].update(max_images=4000, out_dir=str(tmp / "prepared"))
    raw["tokenizer"]["loss"]["adversarial_weight"] = 0.0
    raw["tokenizer"]["train"].update(steps=300, checkpoint_every=100)
    raw["tokenizer"].update(out_dir=str(tmp / "tokenizer"), checkpoint_dir=str(tmp / "tok_ckpt"))
    schedule = {
        "kind": "exponential",
        "peak_lr": 1e-3,
        "final_lr": 1e-4,
        "warmup_steps": 50,
        "decay_start": 200,
    }
    raw["transformer"]["train"].update(steps=400, checkpoint_every=100, schedule=schedule)
    raw["transformer"].update(
        tokens_dir=str(tmp / "tokens"), out_dir=str(tmp / "vim"), checkpoint_dir=str(tmp / "vim_ckpt")
    )
    search = {"cfg_scales": [1.5, 3.0], "temperatures": [1.0], "samples": 300, "reference_images": 400}
    raw["evaluate"].update(
        num_samples=500,
        probes=False,
        classifier_dir=str(tmp / "classifier"),
        weights_dir=str(tmp / "no-inception"),
        sampling_search={**search, "min_class_accuracy": 0.95},
    )
    return parse_params(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    tmp = Path(args.out or tempfile.mkdtemp(prefix="rejection-"))
    p = micro_params(tmp)
    prepare(p.data)
    train_tokenizer(p.tokenizer, p.data.out_dir, seed=0)
    tokenize_dataset(str(Path(p.tokenizer.out_dir) / "tokenizer.safetensors"), p.data.out_dir, tmp / "tokens")
    train_transformer(p.transformer, seed=0)
    print(json.dumps(fit_classifiers(p.evaluate.classifier, p.data.out_dir, p.evaluate.classifier_dir)))
    self_scored = tmp / "classifier_self"  # the FID classifier copied over the scorer
    shutil.copytree(tmp / "classifier", self_scored, dirs_exist_ok=True)
    shutil.copy(self_scored / CLASSIFIER, self_scored / SCORER)
    for seed in (0, 1):
        run = p.model_copy(update={"seed": seed})
        ours = evaluate(run, tmp / "plots")
        old = run.model_copy(
            update={"evaluate": run.evaluate.model_copy(update={"classifier_dir": str(self_scored)})}
        )
        theirs = evaluate(old, tmp / "plots")
        row = {"seed": seed, **{k: ours[k] for k in KEYS}}
        row["fid_domain_rejection_self_scored"] = theirs["fid_domain_rejection"]
        row["class_accuracy_rejection_self_scored"] = theirs["class_accuracy_rejection"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
