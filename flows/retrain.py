"""Retraining: the whole pipeline through DVC under one MLflow pipeline run, then publish and promote.

    python -m flows.retrain                                   # dvc repro, then publish
    python -m flows.retrain --set transformer.train.steps=1000  # a variant: dvc exp run -S ...
    python -m flows.retrain --push                            # and dvc push to the default remote
                                                              # (retried: VIM_PUSH_RETRY_DELAYS=5,15,45)

The pipeline runs as the `pipeline` subflow (flows/pipeline.py): one task per dvc.yaml stage, each a
`dvc repro --single-item` subprocess, so a scheduled run is versioned like a manual one: DVC skips the
stages whose inputs did not change and records dvc.lock. A variant (--set) is one `dvc exp run -S ...`
task instead, as DVC records an experiment per command. Each stage process nests its MLflow run under
this flow's pipeline run (VIM_PARENT_RUN_ID). Then flows/publish.py registers the model as the
challenger and promotes it if it wins.
`flows/deploy.py` puts this flow on a cron schedule.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path

import httpx
from prefect import flow, task

from flows import vcs
from flows.flow_cli import failed_on_bad_input, run_logger
from flows.mlflow_run import check_reachable, enabled, pipeline_run
from flows.pipeline import pipeline
from flows.publish import publish_pipeline
from flows.retry import transient_retries
from vim_core.config import load_params
from vim_core.data.storage import s3_retry_env
from vim_core.errors import TransientError, VimError

log = logging.getLogger("vim.retrain")

REPO = Path(__file__).resolve().parents[1]
# dvc push errors that no retry fixes; anything else (timeouts, refused connections, 5xx) is retried.
# A whole word: a bare "403" also matched endpoint ports (:40373) and object hashes in the message.
_NOT_TRANSIENT = re.compile(r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|NoSuchBucket|\b403\b")
PUSH_RETRY_DELAYS_ENV = "VIM_PUSH_RETRY_DELAYS"
DEFAULT_PUSH_RETRY_DELAYS = (5.0, 15.0, 45.0)
# The versions this process registered, so that main() can say so when the Prefect API is lost afterwards.
_published: dict[str, str] = {}
_lost_api: list[str] = []  # set by main(): the Prefect API went away during the run


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run a command in the repo, its output line by line into the flow's log; VimError on failure."""
    code, tail = vcs.stream(cmd, REPO, run_logger(log), env)
    if code != 0:
        raise VimError(f"{what} failed (exit {code}): {vcs.cause(tail)}")


@task(**transient_retries())
def tracking_ready() -> None:
    """The tracking server answers (retried with backoff: it may be restarting)."""
    check_reachable()


@task
def exp_run(set_params: list[str]) -> None:
    """`dvc exp run -S k=v ...`: a variant, recorded as a DVC experiment (its params stay in the workspace)."""
    cmd = [vcs.dvc_executable(), "exp", "run"]
    for item in set_params:
        cmd += ["-S", item]
    _run(cmd, "dvc exp run")


def repro(set_params: list[str]) -> None:
    """The pipeline subflow, one task per stage; a variant as one `dvc exp run`."""
    if set_params:
        exp_run(set_params)
        return
    state = pipeline(str(REPO), return_state=True)
    if state.is_failed():
        raise VimError(state.message or "the pipeline failed")


def push_retry_delays() -> list[float]:
    """Seconds to wait before each retry of a failed push: VIM_PUSH_RETRY_DELAYS, default "5,15,45".

    One retry per number: "5,15,45" makes four attempts over about a minute, riding out an S3 endpoint
    that restarts; "1,2" gives up sooner, e.g. in tests or an interactive run.
    """
    raw = os.environ.get(PUSH_RETRY_DELAYS_ENV, "").strip()
    if not raw:
        return list(DEFAULT_PUSH_RETRY_DELAYS)
    try:
        delays = [float(part) for part in raw.split(",")]
    except ValueError:
        delays = [-1.0]
    if any(not 0 <= d <= 3600 for d in delays):
        raise VimError(f"{PUSH_RETRY_DELAYS_ENV}={raw!r}: want seconds between retries, e.g. 5,15,45")
    return delays


def _dvc_config() -> dict[str, str]:
    """The repo's DVC config as `dvc config --list` merges it (a later level, e.g. --local, wins)."""
    out = vcs.dvc("config", "--list", cwd=REPO, env=vcs.child_env())
    pairs = (line.partition("=") for line in out.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, _, value in pairs}


@task(**transient_retries())  # push_with_retries sets the waits from VIM_PUSH_RETRY_DELAYS
def push() -> None:
    """`dvc push` to the default remote; network failures retry, refused credentials do not."""
    config = _dvc_config()
    name = config.get("core.remote")
    if not name:
        raise VimError("--push needs a default DVC remote: dvc remote add -d NAME s3://bucket/path")
    endpoint = (
        config.get(f"remote.{name}.endpointurl")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "its default endpoint"
    )
    where = f"dvc push to {config.get(f'remote.{name}.url', name)} at {endpoint}"
    try:
        # botocore's own retries inside one push bounded as for prepare_data; this task retries on top.
        _run([vcs.dvc_executable(), "push"], where, env=s3_retry_env())
    except VimError as err:
        if _NOT_TRANSIENT.search(str(err)):
            raise
        raise TransientError(str(err)) from None


def push_with_retries() -> None:
    """The push task, retried with backoff as push_retry_delays() says."""
    delays = push_retry_delays()
    push.with_options(**transient_retries(delays=delays))()


def _trigger() -> dict[str, str]:
    from prefect.runtime import deployment, flow_run

    tags = {"vim.trigger": deployment.name or "manual", "vim.repo": str(REPO)}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
    return tags


@flow(name="retrain")
def retrain(set_params: list[str] | None = None, push_outputs: bool = False):
    """Run the pipeline through DVC under one MLflow run, register the models, promote if they win."""
    return failed_on_bad_input(_retrain, list(set_params or []), push_outputs)


def _retrain(set_params: list[str], push_outputs: bool) -> dict:
    if not enabled():
        raise VimError("retrain registers models in MLflow; it needs tracking on (unset VIM_TRACKING)")
    if push_outputs:
        push_retry_delays()  # a bad VIM_PUSH_RETRY_DELAYS fails now, not after the pipeline ran
    tracking_ready()
    with contextlib.chdir(REPO), pipeline_run("retrain", tags=_trigger()) as run_id:
        repro(set_params)
        # DVC just brought every output up to date, so publish skips its own `dvc status` check.
        report = publish_pipeline(load_params("params.yaml"), check_status=False)
        _published.update(report["versions"])
        if push_outputs:
            push_with_retries()
    report["pipeline_run_id"] = run_id
    return report


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--set and --push: what a retrain run varies; shared by this CLI and flows.deploy."""
    parser.add_argument(
        "--set",
        dest="set_params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run a variant with dvc exp run -S KEY=VALUE (repeatable)",
    )
    parser.add_argument("--push", action="store_true", help="dvc push the outputs to the default remote")


def lost_prefect_api(err: Exception) -> str:
    """The one-line cause for a retrain whose Prefect API stopped answering, and what it published.

    Tasks report to Prefect in the background, so the work goes on without it; the flow's own state
    changes need the API and fail after the client's retries (PREFECT_CLIENT_MAX_RETRIES, default 5,
    about a minute). The registry is consistent either way (flows.registry moves aliases as one set).
    """
    from prefect.settings import PREFECT_API_URL

    cause = (str(err).strip().splitlines() or [""])[0]
    done = (
        f"the models were published first ({', '.join(f'{n} v{v}' for n, v in _published.items())})"
        if _published
        else "nothing was published"
    )
    return f"lost the Prefect API {PREFECT_API_URL.value()} ({type(err).__name__}: {cause}); {done}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=retrain.__doc__)
    add_run_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        state = retrain(set_params=args.set_params, push_outputs=args.push, return_state=True)
    except httpx.HTTPError as err:  # the engine could not record the run's state: the server went away
        _lost_api.append(str(err))
        print(f"error: {lost_prefect_api(err)}", file=sys.stderr)
        return 1
    if state.is_failed():
        print(f"error: {state.message or 'retrain failed'}", file=sys.stderr)
        return 1
    report = state.result()
    decision = report["promotion"]
    print(
        json.dumps(
            {"versions": report["versions"], "promotion": decision["outcome"], "reason": decision["reason"]}
        )
    )
    return 0


if __name__ == "__main__":
    code = main()
    if _lost_api:
        # Without a server, Prefect's exit hooks retry every queued log record and event in turn, each
        # for the client's whole retry budget: minutes. They can only go to a server that is gone.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
