"""`python -m tests.faults.push_flow`: the retrain flow's push step alone, as the retrain CLI runs it.

Runs flows.retrain.push_with_retries (the `push` task with its retries) in a flow of its own, so a test can
cut the S3 endpoint under a real push without re-running the pipeline; exit 1 with one `error:` line.
"""

import sys

from prefect import flow

from flows.flow_cli import failed_on_bad_input, run_flow_cli
from flows.retrain import push_with_retries


@flow(name="push-only")
def push_only():
    """dvc push to the default remote, retried as `python -m flows.retrain --push` retries it."""
    return failed_on_bad_input(push_with_retries)


if __name__ == "__main__":
    sys.exit(run_flow_cli(lambda: None, lambda: push_only(return_state=True)))
