"""Linear-probe ablation: VIM variants trained on the pipeline's tokens, probed at every block.

Each variant trains from scratch on `transformer.tokens_dir` (run `dvc repro tokenize_dataset` first)
with the pipeline's settings plus its own overrides, then gets the evaluate stage's probe protocol at
every block: `evaluate.max_probe_train` train images (the same seeded subset), the whole test split,
weight decay picked per feature set from `transformer.probe.weight_decays` on held-out train rows. The
raw-pixel baseline on the same rows is printed first. One JSON object per line.

    python -m benchmarks.probe_ablation [--only default unconditional ...] [--set KEY=VALUE ...]
        [--probe-train N]
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from vim_core.config import ConfigError, apply_overrides, load_params
from vim_core.config.transformer import resolve_arch
from vim_core.data.shards import load_split
from vim_core.errors import VimError
from vim_core.eval.probe import extract_features, probe_with_config
from vim_core.train.transformer_trainer import train_transformer

# Per variant, overrides of transformer.model and .train: how much of training sees the null class.
VARIANTS = {
    "default": {},
    "cfg_dropout_0.5": {"train": {"cfg_dropout": 0.5}},
    "unconditional": {"model": {"num_classes": 0}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant"
    )
    parser.add_argument("--probe-train", type=int, default=None, help="default: evaluate.max_probe_train")
    args = parser.parse_args()
    try:
        params = load_params(args.params)
        # An explicit architecture, so --set transformer.model.<field>=... works on a preset too.
        params.transformer.model = resolve_arch(params.transformer.model)
        params = apply_overrides(params, args.set)
    except ConfigError as err:
        parser.error(str(err))
    unknown = set(args.only or ()) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run(params, args, Path(tmp))
    except VimError as err:
        raise SystemExit(f"error: {err}") from None


def run(params, args, tmp: Path) -> None:
    tcfg, p = params.transformer, params.transformer.probe
    train_tok, train_y = load_split(tcfg.tokens_dir, "train")
    test_tok, test_y = load_split(tcfg.tokens_dir, "test")
    train_px, px_y = load_split(params.data.out_dir, "train")
    test_px, _ = load_split(params.data.out_dir, "test")
    if not (np.array_equal(train_y, px_y) and len(test_px) == len(test_tok)):
        raise VimError(f"{tcfg.tokens_dir} was not made from {params.data.out_dir}: re-run tokenize_dataset")
    limit = args.probe_train or params.evaluate.max_probe_train or len(train_tok)
    idx = np.random.default_rng(params.evaluate.seed).permutation(len(train_tok))[:limit]
    num_classes = int(max(train_y.max(), test_y.max())) + 1

    def probe(train_feats, test_feats) -> dict:
        res = probe_with_config(
            p, train_feats, train_y[idx], test_feats, test_y, num_classes, params.evaluate.seed
        )
        return {"accuracy": round(res["accuracy"], 4), "weight_decay": res["weight_decay"]}

    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    print(
        json.dumps(
            {"variant": "pixels", "probe_train": len(idx), **probe(flat(train_px[idx]), flat(test_px))}
        )
    )
    for name, change in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        cfg = tcfg.model_copy(deep=True)
        cfg.model = cfg.model.model_copy(update=change.get("model", {}))
        cfg.train = cfg.train.model_copy(update=change.get("train", {}))
        cfg.train.resume = "never"
        cfg.out_dir = str(tmp / name / "model")
        cfg.checkpoint_dir = str(tmp / name / "checkpoints")
        trained = train_transformer(cfg, seed=params.seed)
        vim = trained.model.eval()
        blocks = {
            b: probe(extract_features(vim, train_tok[idx], block=b), extract_features(vim, test_tok, block=b))
            for b in range(vim.cfg.layers)
        }
        print(
            json.dumps(
                {
                    "variant": name,
                    "model": cfg.resolved_model().model_dump(mode="json"),
                    "val_bits_per_token": trained.metrics["val_bits_per_token"],
                    "steps": trained.metrics["steps"],
                    "train_seconds": trained.metrics["train_seconds"],
                    "probe_train": len(idx),
                    "probe_by_block": blocks,
                    "seed": params.seed,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
