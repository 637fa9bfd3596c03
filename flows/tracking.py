"""MLflow experiment tracking: the trainers' Tracker on MLflow, and a stage's run with its outputs.

stage_run() opens a stage's MLflow run (flows/mlflow_run.py has the run lifecycle: where runs go, how a
stage nests under its pipeline run, the tags) and yields an MlflowTracker on it. VIM_TRACKING=off turns
MLflow off: stage_run() then yields a tracker that discards everything (vim_core's NullTracker).

Tracking never stops a stage's training: every call goes through the run's outbox (flows/outbox.py),
which holds calls while the server is away and replays them, in order, when it answers again. At the end
of the stage the outbox is flushed for up to VIM_TRACKING_FLUSH seconds (default 45); if the server is
still away, the stage keeps its outputs, prints one warning line naming the server and the number of
calls not delivered, and succeeds: the run then stays RUNNING on the server, with what reached it.

log_stage_outputs() logs what dvc.yaml declares as a stage's metrics and plots (flows/stages.py), so a
stage's MLflow run and `dvc metrics show` / `dvc plots show` present the same files.
"""

import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from flows import mlflow_run
from flows.mlflow_run import sanitize_key
from flows.outbox import DEFAULT_FLUSH_S, FLUSH_ENV, outbox, outbox_dir, replay_persisted, warning_line
from flows.stages import declared
from vim_core.errors import VimError
from vim_core.redact import redact_text
from vim_core.train.tracking import NullTracker, Tracker, flatten, to_hwc

log = logging.getLogger("vim.tracking")

# MLflow's limits (mlflow.utils.validation), spelled out so a change there fails a test, not a run.
MAX_PARAM_VALUE = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


def flatten_params(params: dict) -> dict[str, str]:
    """Nested dicts to dotted keys; values as strings cut to MLflow's limit, URLs without credentials
    (a data.source.url like https://user:token@host/... is logged as https://REDACTED@host/...)."""
    out = {}
    for name, value in flatten(params).items():
        text = json.dumps(list(value), default=str) if isinstance(value, list | tuple) else str(value)
        out[sanitize_key(name)] = redact_text(text)[:MAX_PARAM_VALUE]
    return out


def _as_float(value) -> float | None:
    if hasattr(value, "detach"):  # a torch scalar
        value = value.detach().float().item()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class MlflowTracker:
    """The trainers' Tracker (vim_core.train.tracking) writing to one MLflow run.

    It holds the run id and calls MlflowClient, not the fluent API, so it works from any thread (Prefect
    may run a task in a worker thread, where MLflow's thread-local active run is not set). Its calls go
    through the run's outbox, shared by every tracker of the run in this process.
    """

    def __init__(self, run_id: str | None = None):
        import mlflow

        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise VimError("MlflowTracker needs a run: pass run_id or open stage_run() first")
            run_id = active.info.run_id
        self.run_id = run_id
        self.outbox = outbox(run_id)
        self._params: dict[str, str] = {}

    def log_params(self, params: dict) -> None:

        new = {}
        for key, value in flatten_params(params).items():
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                # MLflow params are write-once; a changed value is a caller bug worth a warning, not a crash.
                log.warning("param %s already logged as %r; keeping it, not %r", key, old, value)
        items = sorted(new.items())
        for i in range(0, len(items), PARAMS_PER_BATCH):
            chunk = [[k, v] for k, v in items[i : i + PARAMS_PER_BATCH]]
            self.outbox.send("params", ("log_batch", {"params": chunk}))
        self._params.update(new)

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            number = _as_float(value)
            if number is None:
                log.debug("metric %s=%r is not a number; skipped", key, value)
                continue
            batch.append([sanitize_key(key), number, now, int(step)])  # mlflow.entities.Metric's arguments
        for i in range(0, len(batch), METRICS_PER_BATCH):
            chunk = batch[i : i + METRICS_PER_BATCH]
            what = f"metrics of step {int(step)}"
            self.outbox.send(what, ("log_batch", {"metrics": chunk}))

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        """A file or folder; `name` is its path inside the run's artifacts (default: its own name)."""
        src = Path(path)
        if src.is_dir():
            folder = name or src.name
            self.outbox.send(folder, ("log_artifacts", {"artifact_path": folder}), str(src))
            return
        dest = Path(name) if name else Path(src.name)
        folder = None if str(dest.parent) == "." else dest.parent.as_posix()
        if dest.name == src.name:
            self._send_file(src, folder, dest)
            return
        with tempfile.TemporaryDirectory() as tmp:  # MLflow names the artifact after the local file
            renamed = Path(tmp) / dest.name
            shutil.copy2(src, renamed)
            self._send_file(renamed, folder, dest)

    def _send_file(self, src: Path, folder: str | None, dest: Path) -> None:
        """Held calls name a copy of the file (the outbox makes it), so a later rewrite does not leak in."""
        op = ("log_artifact", {"artifact_path": folder})
        self.outbox.send(dest.as_posix(), op, str(src))

    def log_image(self, image: str | Path | np.ndarray, name: str) -> None:
        """A uint8 array or an image file, stored as images/<name>.png (or the file's own suffix)."""
        if isinstance(image, str | Path):
            src = Path(image)
            stem = name if Path(name).suffix else f"{name}{src.suffix}"
            self.log_artifact(src, f"images/{stem}")
            return
        file = f"images/{name if name.endswith('.png') else f'{name}.png'}"
        pixels = np.array(to_hwc(image))  # a copy: the caller may reuse its buffer before a held call goes
        self.outbox.send(file, ("log_image", {"pixels": pixels, "artifact_file": file}))


class _Discard(NullTracker):
    """What stage_run yields when tracking is off: vim_core's NullTracker, with no run."""

    run_id = None


def tracker_for(run_id: str | None) -> Tracker:
    """The tracker a task hands to a trainer: MLflow for a run id, else one that discards everything.

    Tasks take the run id rather than the tracker, so Prefect sees a plain string as the task input.
    """
    return MlflowTracker(run_id) if run_id else _Discard()


@contextmanager
def stage_run(stage_name: str, params=None) -> Iterator[MlflowTracker]:
    """A stage's run (mlflow_run.open_stage_run) with `params` logged flattened; yields its MlflowTracker.

    `params` is a dict or a pydantic model. With tracking off, yields a tracker that discards everything.
    The run ends FINISHED, or FAILED when the block raises, once the outbox is flushed; calls the server
    never took are reported in one warning line and do not fail the stage (the module docstring says why).
    """
    if not mlflow_run.enabled():
        yield _Discard()
        return
    flush_s = mlflow_run.seconds_from_env(FLUSH_ENV, DEFAULT_FLUSH_S)  # a bad value fails before the work
    tracker = MlflowTracker(mlflow_run.open_stage_run(stage_name))
    _replay_earlier_runs()
    status = "FAILED"
    try:
        tracker.log_params(_params_dict(params))
        yield tracker
        status = "FINISHED"
    finally:
        _end_stage_run(tracker.outbox, stage_name, status, flush_s)


def _replay_earlier_runs() -> None:
    """What earlier stages persisted because the server was away (flows/outbox.py): the server answers
    now (open_stage_run waited for it), so deliver it; a failure here never stops the stage."""
    try:
        counts = replay_persisted()
    except Exception as err:  # the replay is a courtesy to earlier runs: never this stage's failure
        log.warning("replaying kept tracking calls failed: %s", " ".join(str(err).split())[:300])
        return
    if counts["delivered"] or counts["refused"]:
        log.info("delivered %(delivered)d kept tracking calls of earlier runs (%(left)d still kept)", counts)


def _end_stage_run(box, stage_name: str, status: str, flush_s: float) -> None:
    """Queue the run's end behind its calls, flush, warn about what the server never took, then take the
    run off MLflow's active-run stack (end_run), which must not wait on an absent server either."""
    import mlflow

    box.send(f"end ({status})", ("set_terminated", {"status": status}))
    undelivered = box.close(flush_s)
    if undelivered:
        print(warning_line(box, undelivered, stage_name), file=sys.stderr)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == box.run_id:
        # end_run pops the stack, then repeats set_terminated: harmless when delivered, quick if not.
        with mlflow_run.quick_http():
            try:
                mlflow.end_run(status)
            except Exception as err:
                if not mlflow_run.is_outage(err, box.uri):
                    raise


def _params_dict(params) -> dict:
    if params is None:
        return {}
    if hasattr(params, "model_dump"):
        return params.model_dump(mode="json")
    return dict(params)


# ---- a stage's output files


def log_json_metrics(tracker: Tracker, path: str | Path, step: int = 0) -> None:
    """A stage's metrics JSON: its numbers as run metrics (nested keys joined by '/'), the file as artifact."""
    path = Path(path)
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    tracker.log_metrics(_numbers(data), step)
    tracker.log_artifact(path, f"metrics/{path.name}")


def _numbers(data: dict) -> dict[str, float]:
    """The measurements: numbers, not `definitions` (how each metric was computed: sample counts, seeds)."""
    flat = flatten(data, "/")
    measured = {k: v for k, v in flat.items() if "definitions" not in k.split("/")}
    return {k: v for k, v in measured.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def log_stage_outputs(tracker: Tracker, stage: str) -> None:
    """What dvc.yaml declares as the stage's metrics and plots: numbers as metrics, PNGs as images, CSVs
    as artifacts. Reading dvc.yaml keeps MLflow and `dvc metrics/plots` showing the same files."""
    spec = declared(stage)
    for path in spec.metrics:
        log_json_metrics(tracker, path)
    for path in map(Path, spec.plots):
        if not path.is_file():
            continue
        if path.suffix.lower() == ".png":
            tracker.log_image(path, path.stem)
        else:
            tracker.log_artifact(path, f"plots/{path.name}")


def flush_main(argv: list[str] | None = None) -> int:
    """`python -m flows.tracking flush`: deliver the tracking calls that stages kept because the MLflow
    server was away when they ended; exit 0 when nothing is left, 1 when some are still kept."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.tracking", description=flush_main.__doc__)
    parser.add_argument("command", choices=["flush"])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        mlflow_run.check_reachable(mlflow_run.tracking_uri(), timeout=5.0)
        counts = replay_persisted()
    except VimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    live = f", {counts['live']} runs of them held by a live stage" if counts["live"] else ""
    print(
        f"delivered {counts['delivered']} kept tracking calls ({counts['runs']} runs complete, "
        f"{counts['refused']} refused by the server); {counts['left']} still kept in {outbox_dir()}{live}"
    )
    return 1 if counts["left"] else 0


if __name__ == "__main__":
    sys.exit(flush_main())
