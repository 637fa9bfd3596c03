"""Stage train_classifier: the domain classifier and the rejection scorer, on data/prepared only."""

import sys

from flows.common import run_stage
from flows.stages import Stage
from vim_core.config import Params


def fit(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Train both classifiers on the train split, the weight decay picked on val."""
    from vim_core.eval.classifier_stage import fit_classifiers

    return fit_classifiers(params.evaluate.classifier, params.data.out_dir, params.evaluate.classifier_dir)


if __name__ == "__main__":
    sys.exit(run_stage("train_classifier", fit))
