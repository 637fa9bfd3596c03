"""Stage tokenize_dataset: encode data/prepared with the trained tokenizer into uint16 token shards."""

import json
import sys
from pathlib import Path

from prefect import flow, task

from flows.common import failed_on_bad_input, run_stage, tracked_stage
from vim_core.config import Params, load_params
from vim_core.io import atomic_write_text


@task
def encode(params: Params) -> dict:
    from vim_core.data.tokenize import tokenize_dataset

    tokenizer = str(Path(params.tokenizer.out_dir) / "tokenizer.safetensors")
    manifest = tokenize_dataset(
        tokenizer, params.data.out_dir, params.transformer.tokens_dir, progress=sys.stderr.isatty()
    )
    return {
        "counts": {s: v["count"] for s, v in manifest["splits"].items()},
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "grid": manifest["grid"],
        "codebook_size": manifest["codebook_size"],
    }


@flow(name="tokenize_dataset")
def tokenize_dataset_flow(params_path: str = "params.yaml"):
    """Encode the prepared dataset into token shards."""
    return failed_on_bad_input(_tokenize, params_path)


def _tokenize(params_path: str) -> dict:
    params = load_params(params_path)
    with tracked_stage("tokenize_dataset", params):
        summary = encode(params)
        atomic_write_text("metrics/tokens.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(run_stage(tokenize_dataset_flow))
