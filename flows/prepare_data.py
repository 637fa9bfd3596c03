"""Stage prepare_data: stream the configured source into data/prepared (shards + manifest)."""

import json
import sys

from prefect import flow, task

from flows.common import failed_on_bad_input, retry_transient, run_stage, tracked_stage
from vim_core.config import DataConfig, load_params
from vim_core.data.prepare import prepare
from vim_core.io import atomic_write_text


@task(retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_transient)
def write_dataset(cfg: DataConfig) -> dict:
    report = prepare(cfg, progress=sys.stderr.isatty())
    return {"counts": report.counts, "skipped": report.skipped, "version": report.manifest["version"]}


@flow(name="prepare_data")
def prepare_data(params_path: str = "params.yaml"):
    """Stream the configured source into a sharded, split dataset."""
    return failed_on_bad_input(_prepare_data, params_path)


def _prepare_data(params_path: str) -> dict:
    params = load_params(params_path)
    with tracked_stage("prepare_data", params):
        summary = write_dataset(params.data)
        atomic_write_text("metrics/data.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(run_stage(prepare_data))
