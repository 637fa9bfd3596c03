"""What every stage shares: its plain CLI (run_stage), tracking, and one-line errors.

A stage process is plain Python run by DVC: it imports no Prefect and starts no server. Prefect sits above
DVC (flows/pipeline.py), never inside a stage.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.dvc_locks import sweep_if_under_dvc
from flows.stages import Stage, declared
from vim_core.config import Params, load_params
from vim_core.errors import ConfigError, TransientError, VimError
from vim_core.io import atomic_write_text
from vim_core.redact import redact_text

log = logging.getLogger("vim")

EXIT_TRANSIENT = 75  # EX_TEMPFAIL (sysexits.h): the orchestrator retries a stage that exits with it


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


def run_body(name: str, body: Callable[[Params, Stage, str | None], dict], params_path: str) -> dict:
    """Stage `name`'s work: load the params, open its tracked run, call `body(params, stage, run_id)` and
    write what it returns as the metrics JSON dvc.yaml declares, atomically: a failed stage leaves the old
    file. A dvc.yaml without one metrics file fails before any work."""
    params = load_params(params_path)
    stage = declared(name)
    metrics_file = stage.metrics_file
    with tracked_stage(name, params) as tracker:
        metrics = body(params, stage, tracker.run_id)
        atomic_write_text(metrics_file, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def run_stage(
    name: str,
    body: Callable[[Params, Stage, str | None], dict],
    argv: list[str] | None = None,
    worker_node: Callable[[Params], object] | None = None,
) -> int:
    """Stage `name` as a CLI (`python -m flows.NAME`): exit 0, or print one line per problem and exit 2
    (bad params), EXIT_TRANSIENT (worth a retry) or 1 (any other VimError).

    On a machine other than node 0 of a multi-machine run (PET_NODE_RANK > 0), a training stage runs
    `worker_node(params)` instead: its ranks, with no tracking and no outputs of its own.
    """
    parser = argparse.ArgumentParser(description=body.__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    if worker_node is not None and os.environ.get("PET_NODE_RANK", "0") not in ("", "0"):
        return cli(lambda: worker_node(load_params(args.params)))
    sweep_if_under_dvc()  # what an earlier, killed `dvc repro` left in DVC's lock file
    return cli(lambda: run_body(name, body, args.params))


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


def setup_logging() -> None:
    """INFO to stderr, progress lines (vim_core.progress) included, every record redacted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Prefect's logging set-up resets the root logger to WARNING when a flow starts; progress lines set
    # their own level so that they still reach stderr.
    logging.getLogger("vim.progress").setLevel(logging.INFO)
    redact_logs()


def cli(work: Callable[[], object]) -> int:
    """work() with logging set up: exit 0, or one `error:` line per problem and the exit code for its kind."""
    setup_logging()
    try:
        work()
    except VimError as err:
        return report(err)
    return 0


def report(err: VimError) -> int:
    """Print a VimError as `error:` lines; its exit code: 2 bad params, EXIT_TRANSIENT, else 1."""
    bad_params = isinstance(err, ConfigError)
    for line in err.lines if bad_params else [str(err)]:
        print(f"error: {line}", file=sys.stderr)
    if bad_params:
        return 2
    return EXIT_TRANSIENT if isinstance(err, TransientError) else 1
