"""Stage tokenize_dataset: encode data/prepared with the trained tokenizer into uint16 token shards."""

import sys
from pathlib import Path

from flows.common import run_stage
from flows.stages import Stage
from vim_core.config import Params


def encode(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Encode the prepared dataset into token shards."""
    from vim_core.tokenizer.encode_dataset import tokenize_dataset

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


if __name__ == "__main__":
    sys.exit(run_stage("tokenize_dataset", encode))
