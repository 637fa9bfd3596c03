"""Stage prepare_data: stream the configured source into data/prepared (shards + manifest)."""

import sys

from flows.common import run_stage
from flows.stages import Stage
from vim_core.config import Params
from vim_core.data.prepare import prepare


def write_dataset(params: Params, stage: Stage, run_id: str | None) -> dict:
    """Stream the configured source into a sharded, split dataset."""
    report = prepare(params.data, progress=sys.stderr.isatty())
    return {"counts": report.counts, "skipped": report.skipped, "version": report.manifest["version"]}


if __name__ == "__main__":
    sys.exit(run_stage("prepare_data", write_dataset))
