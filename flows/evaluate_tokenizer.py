"""Stage evaluate_tokenizer: the tokenizer's reconstruction metrics alone (rFID_domain, PSNR, SSIM, usage)."""

import sys

from flows.common import run_stage
from flows.stages import Stage
from vim_core.config import Params


def score(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Score the exported tokenizer's reconstructions of the test split."""
    from vim_core.eval.reconstruction import evaluate_tokenizer

    return evaluate_tokenizer(params)


if __name__ == "__main__":
    sys.exit(run_stage("evaluate_tokenizer", score))
