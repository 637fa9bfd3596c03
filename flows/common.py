"""What every stage shares: its declaration as a Prefect flow (stage_flow), tracking, and one-line errors."""

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.dvc_locks import sweep_if_under_dvc
from flows.ephemeral import start_ephemeral_api
from flows.stages import Stage, declared
from vim_core.config import Params, load_params
from vim_core.errors import ConfigError, TransientError, VimError
from vim_core.io import atomic_write_text
from vim_core.redact import redact_text

log = logging.getLogger("vim")


def retry_transient(task, task_run, state) -> bool:
    """Retry only failures that may pass (storage or server unreachable), never bad input."""
    try:
        state.result()
    except TransientError:
        return True
    except VimError:
        return False
    except (ConnectionError, TimeoutError, OSError):
        return True
    except Exception:
        return False
    return False


def stage_params(params, stage: str, dvc_yaml: str | Path | None = None) -> dict:
    """The params.yaml sections a stage declares in dvc.yaml (all of them when it declares none)."""
    full = params.model_dump(mode="json")
    keys = declared(stage, dvc_yaml).params
    if not keys:
        return full
    out: dict = {}
    for key in keys:
        src, dst, parts = full, out, key.split(".")
        for part in parts[:-1]:
            src = src.get(part, {}) if isinstance(src, dict) else {}
            dst = dst.setdefault(part, {})
        if isinstance(src, dict) and parts[-1] in src:
            dst[parts[-1]] = src[parts[-1]]
    return out


@contextmanager
def tracked_stage(stage: str, params) -> Iterator:
    """One MLflow run for a DVC stage (see flows.tracking.stage_run); yields its tracker.

    Logs the params the stage declares in dvc.yaml and, when the block succeeds, the metrics and plots it
    declares there. With VIM_TRACKING=off the tracker discards everything.
    """
    from flows.tracking import log_stage_outputs, stage_run

    with stage_run(stage, stage_params(params, stage)) as tracker:
        yield tracker
        log_stage_outputs(tracker, stage)


def stage_flow(name: str, body: Callable[[Params, Stage, str | None], dict]):
    """A DVC stage as a Prefect flow named after it, whose work is `body(params, stage, run_id)`, a task.

    The flow loads the params, opens the stage's tracked MLflow run, calls the body with the params, the
    stage as dvc.yaml declares it and the run id (None with tracking off), and writes what the body returns
    as the metrics JSON dvc.yaml declares, atomically: a failed stage leaves the old file. The body's
    docstring describes the flow. A VimError ends the flow Failed with its one-line cause.
    """
    from prefect import flow

    def stage_body(params_path: str = "params.yaml"):
        return failed_on_bad_input(_run_stage_body, name, body, params_path)

    stage_body.__doc__ = body.__doc__
    return flow(name=name)(stage_body)


def _run_stage_body(name: str, body: Callable, params_path: str) -> dict:
    params = load_params(params_path)
    stage = declared(name)
    metrics_file = stage.metrics_file  # a dvc.yaml without one fails here, before any work
    with tracked_stage(name, params) as tracker:
        metrics = body(params, stage, tracker.run_id)
        atomic_write_text(metrics_file, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def failed_on_bad_input(fn: Callable[..., object], *args, **kwargs):
    """Call a flow body; turn a VimError into a Failed state with its one-line cause, not a traceback."""
    from prefect.states import Failed

    try:
        return fn(*args, **kwargs)
    except VimError as err:
        kind = "transient" if isinstance(err, TransientError) else "input"
        return Failed(message=str(err), data={"error": str(err), "kind": kind})


def run_stage(
    flow: Callable[..., object],
    argv: list[str] | None = None,
    worker_node: Callable[[Params], object] | None = None,
) -> int:
    """Run a stage flow as a CLI: exit 0, or print one line per problem and exit non-zero.

    On a machine other than node 0 of a multi-machine run (PET_NODE_RANK > 0), a training stage runs
    `worker_node(params)` instead: its ranks, with no flow, no tracking and no outputs of its own.
    """
    import argparse
    import os

    parser = argparse.ArgumentParser(description=flow.__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    if worker_node is not None and os.environ.get("PET_NODE_RANK", "0") not in ("", "0"):
        return run_flow_cli(lambda: None, lambda: worker_node(load_params(args.params)), flow_state=False)
    sweep_if_under_dvc()  # what an earlier, killed `dvc repro` left in DVC's lock file
    return run_flow_cli(
        lambda: load_params(args.params),  # fail before Prefect starts, in one line per problem
        lambda: flow(params_path=args.params, return_state=True),
    )


def redact_logs() -> None:
    """Every log record made in this process from now on has its URLs' credentials redacted, whichever
    handler (the console, Prefect's API log handler) takes it: done once, in the record factory, the
    logging module's public hook for this."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # a traceback quotes URLs too: format it redacted now
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    make.redacts = True
    logging.setLogRecordFactory(make)


def run_flow_cli(validate: Callable[[], object], run: Callable[[], object], flow_state: bool = True) -> int:
    """validate(), then run() a flow for its final state: exit 0, or one line per problem and exit 2 for
    bad input files (ConfigError) or 1 for any other VimError, including a failed flow run. With
    flow_state=False, run() is plain work, not a flow: no Prefect API is started and nothing is returned."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Prefect's logging set-up resets the root logger to WARNING when the flow starts; progress lines
    # (vim_core.progress) set their own level so that they still reach stderr.
    logging.getLogger("vim.progress").setLevel(logging.INFO)
    redact_logs()
    try:
        validate()
        if not flow_state:
            run()
            return 0
        start_ephemeral_api()  # in ephemeral mode: a server that dies with this process, even on SIGKILL
        state = run()
        if state.is_failed():
            raise VimError(state.message or "the flow failed")
    except VimError as err:
        bad_params = isinstance(err, ConfigError)
        for line in err.lines if bad_params else [str(err)]:
            print(f"error: {line}", file=sys.stderr)
        return 2 if bad_params else 1
    return 0
