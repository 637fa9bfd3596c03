"""Codebook ablation (paper Table 3) on the embedded default: same data, steps, seed and remedies.

Variants: the default (ViT, 32-d, l2), 32-d without l2, no factorization with l2, and the CNN vanilla
VQGAN baseline. Prints one JSON object per variant with codebook_usage and psnr.

    python -m benchmarks.codebook_ablation [--params params.yaml] [--steps N]
"""

import argparse
import json
import tempfile
from pathlib import Path

from vim_core.config import load_params
from vim_core.data.prepare import prepare
from vim_core.data.shards import read_manifest
from vim_core.errors import VimError
from vim_core.train.tokenizer_trainer import train_tokenizer

VARIANTS = {
    "vit_32d_l2 (default)": {},
    "vit_32d_no_l2": {"l2_normalize": False},
    "vit_no_factorization_l2": {"code_dim": None},
    "cnn_vanilla": {"arch": "cnn", "code_dim": None, "l2_normalize": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override tokenizer.train.steps")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    args = parser.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = params.data.out_dir
        try:
            read_manifest(data_root)
        except VimError:
            data_root = str(Path(tmp) / "prepared")
            prepare(params.data.model_copy(update={"out_dir": data_root}))
        for name, change in VARIANTS.items():
            if args.only and name.split()[0] not in args.only:
                continue
            tok = params.tokenizer.model_copy(deep=True)
            for key, value in change.items():
                setattr(tok.model, key, value)
            if args.steps:
                tok.train.steps = args.steps
            tok.train.resume = "never"
            tok.out_dir = str(Path(tmp) / name.split()[0])
            tok.checkpoint_dir = str(Path(tmp) / "ckpt" / name.split()[0])
            run = train_tokenizer(tok, data_root, seed=params.seed)
            m = run.metrics
            print(
                json.dumps(
                    {
                        "variant": name,
                        "codebook_usage": m["codebook_usage"],
                        "psnr": m["psnr"],
                        "codebook_perplexity": m["codebook_perplexity"],
                        "steps": m["steps"],
                        "train_seconds": m["train_seconds"],
                        "seed": params.seed,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
