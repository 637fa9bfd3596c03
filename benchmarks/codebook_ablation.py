"""Codebook ablation (paper Table 3) on the embedded default: same data, steps, seed and remedies.

Variants: the default (ViT, 32-d, l2), 32-d without l2, no factorization with l2, and the CNN vanilla
VQGAN baseline. Prints one JSON object per variant with codebook_usage, psnr and rfid_domain: the FID
of the test split's reconstructions against the originals in the features of the pipeline's domain
classifier (trained here once, with the evaluate stage's settings, on the train split).

`--recipe paper` turns off the CPU remedies of params.yaml (data init, dead-code restarts, the codebook's
larger learning rate) for every variant, so the variants compare as the paper trains them.

    python -m benchmarks.codebook_ablation [--params params.yaml] [--steps N] [--recipe pipeline|paper]
        [--only VARIANT ...] [--set tokenizer.loss.adversarial_start_step=200 ...]
"""

import argparse
import json
import tempfile
from pathlib import Path

from vim_core.config import apply_overrides, load_params
from vim_core.data.prepare import prepare
from vim_core.data.shards import load_split, read_manifest
from vim_core.errors import ConfigError, VimError
from vim_core.eval.classifier import save_classifier, train_classifier
from vim_core.eval.fidelity import domain_metrics
from vim_core.train.tokenizer_trainer import train_tokenizer

VARIANTS = {
    "vit_32d_l2 (default)": {},
    "vit_32d_no_l2": {"l2_normalize": False},
    "vit_no_factorization_l2": {"code_dim": None},
    "cnn_vanilla": {"arch": "cnn", "code_dim": None, "l2_normalize": False},
}
# The paper's codebook training: normal init, no restarts, one learning rate for all weights.
PAPER_RECIPE = {"codebook_init": "normal", "dead_code_threshold": 0.0, "codebook_lr_multiplier": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override tokenizer.train.steps")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params override for every variant, as dvc exp run -S (repeatable)",
    )
    parser.add_argument(
        "--recipe", choices=("pipeline", "paper"), default="pipeline", help="paper: remedies off"
    )
    args = parser.parse_args()
    sets = args.set + ([f"tokenizer.train.steps={args.steps}"] if args.steps is not None else [])
    try:  # checked before any training, e.g. that the warmup fits in the steps
        params = apply_overrides(load_params(args.params), sets)
    except ConfigError as err:
        parser.error(str(err))
    with tempfile.TemporaryDirectory() as tmp:
        data_root = params.data.out_dir
        try:
            read_manifest(data_root)
        except VimError:
            data_root = str(Path(tmp) / "prepared")
            prepare(params.data.model_copy(update={"out_dir": data_root}))
        clf_path = _domain_classifier(params, data_root, Path(tmp) / "classifier.safetensors")
        test_x, _ = load_split(data_root, "test")
        for name, change in VARIANTS.items():
            if args.only and name.split()[0] not in args.only:
                continue
            tok = params.tokenizer.model_copy(deep=True)
            recipe = PAPER_RECIPE if args.recipe == "paper" else {}
            for key, value in {**recipe, **change}.items():
                setattr(tok.model, key, value)
            tok.train.resume = "never"
            tok.out_dir = str(Path(tmp) / name.split()[0])
            tok.checkpoint_dir = str(Path(tmp) / "ckpt" / name.split()[0])
            run = train_tokenizer(tok, data_root, seed=params.seed)
            m = run.metrics
            model = run.model.eval()
            recon = model.decode_uint8(model.encode_uint8(test_x))
            rfid = domain_metrics(
                recon,
                test_x,
                clf_path,
                kid_subset_size=params.evaluate.kid_subset_size,
                seed=params.evaluate.seed,
            )
            print(
                json.dumps(
                    {
                        "variant": name,
                        "recipe": args.recipe,
                        "codebook_usage": m["codebook_usage"],
                        "psnr": m["psnr"],
                        "rfid_domain": round(rfid["fid_domain"], 3),
                        "codebook_perplexity": m["codebook_perplexity"],
                        "steps": m["steps"],
                        "train_seconds": m["train_seconds"],
                        "seed": params.seed,
                    }
                ),
                flush=True,
            )


def _domain_classifier(params, data_root: str, path: Path) -> str:
    """The evaluate stage's domain classifier, trained on this data with its settings."""
    (tx, ty), (vx, vy) = load_split(data_root, "train"), load_split(data_root, "test")
    c = params.evaluate.classifier
    model, _ = train_classifier(
        tx, ty, vx, vy, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, seed=params.evaluate.seed
    )
    save_classifier(model, str(path))
    return str(path)


if __name__ == "__main__":
    main()
