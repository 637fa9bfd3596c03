"""MLflow experiment tracking: the trainers' Tracker on MLflow, and one parent run per pipeline execution.

Each DVC stage is its own process, so a stage cannot see the pipeline's run through MLflow's
(thread-local) active-run stack. pipeline_run() exports the parent run id as VIM_PARENT_RUN_ID, together
with the resolved MLFLOW_TRACKING_URI, and every stage process started beneath it (dvc repro, dvc exp run)
opens its stage_run() as a nested run of that parent. A stage run with no parent in the environment (a
bare `dvc repro`) is a top-level run of the same experiment.

The embedded default is a sqlite store `mlflow.db` in the repo root with artifacts under `mlartifacts/`
(both git-ignored); MLFLOW_TRACKING_URI points everything at a server instead. VIM_TRACKING=off turns
MLflow off: stage_run() then yields a tracker that discards everything (vim_core's NullTracker).

log_stage_outputs() logs what dvc.yaml declares as a stage's metrics and plots, so a stage's MLflow run
and `dvc metrics show` / `dvc plots show` present the same files.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vim_core.errors import TransientError, VimError
from vim_core.train.tracking import NullTracker, Tracker

log = logging.getLogger("vim.tracking")

REPO = Path(__file__).resolve().parents[1]
PARENT_ENV = "VIM_PARENT_RUN_ID"
SWITCH_ENV = "VIM_TRACKING"
DEFAULT_EXPERIMENT = "vim"

# MLflow's limits (mlflow.utils.validation), spelled out so a change there fails a test, not a run.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


# ---- where runs go


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded sqlite store in the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlflow.db'}"


def artifact_location() -> str | None:
    """Where a new experiment keeps artifacts: mlartifacts/ for a local store; a server decides its own."""
    if _is_remote(tracking_uri()):
        return None
    return (REPO / "mlartifacts").as_uri()


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def _is_remote(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


def _redact(uri: str) -> str:
    """The URI without user:password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def check_reachable(uri: str | None = None, timeout: float = 3.0) -> None:
    """Fail fast with TransientError when the configured tracking server does not answer.

    Without this, MLflow's client retries each call with backoff for minutes before giving up.
    Local stores (sqlite, file) are always reachable.
    """
    uri = uri or tracking_uri()
    if not _is_remote(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:  # it answered (e.g. 401 behind auth): reachable
            return
        reason = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    raise TransientError(f"MLflow tracking server {_redact(uri)} did not answer ({reason})")


def configure() -> str:
    """Point MLflow's fluent API at tracking_uri() (and MLFLOW_REGISTRY_URI if set); return the URI."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def client():
    from mlflow import MlflowClient

    uri = configure()
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def ensure_experiment(name: str | None = None) -> str:
    """The experiment's id, creating it (with mlartifacts/ as its root for a local store) if missing."""
    c = client()
    name = name or experiment_name()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=artifact_location())
    except MlflowException:  # another stage created it meanwhile
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---- what a run records about where it came from


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def revision_tags() -> dict[str, str]:
    """Git commit and dirty flag, and the sha256 of dvc.lock as it stood when the stage started."""
    tags = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["vim.git.commit"] = commit
        status = _git("status", "--porcelain")
        tags["vim.git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
    lock = REPO / "dvc.lock"
    if lock.is_file():
        tags["vim.dvc.lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    for env, tag in (
        ("DVC_EXP_NAME", "vim.dvc.exp_name"),  # set by `dvc exp run`
        ("DVC_EXP_BASELINE_REV", "vim.dvc.baseline_rev"),
        ("VIM_STUDY", "vim.study"),  # set by flows.study for each arm's run
        ("VIM_ARM", "vim.arm"),
        ("VIM_SEED", "vim.seed"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


# ---- the Tracker


def sanitize_key(key: str) -> str:
    """A metric or param name MLflow accepts: allowed characters, no empty/'.'/'..' path parts, <= 250."""
    parts = [_BAD_KEY_CHARS.sub("_", p) for p in str(key).split("/") if p]
    parts = ["_" if p in (".", "..") else p for p in parts]
    name = "/".join(parts) or "_"
    if len(name) > MAX_KEY:  # keep distinct long keys distinct
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_KEY - 9].rstrip('/')}_{digest}"
    return name


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys; values as strings cut to MLflow's limit."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(list(value), default=str) if isinstance(value, list | tuple) else str(value)
        out[sanitize_key(name)] = text[:MAX_PARAM_VALUE]
    return out


def _as_float(value) -> float | None:
    if hasattr(value, "detach"):  # a torch scalar; avoid importing torch here
        value = value.detach().float().item()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _hwc(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, C) or (C, H, W) to what PIL and MLflow want: (H, W) or (H, W, C)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"log_image wants uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


class MlflowTracker:
    """The trainers' Tracker (vim_core.train.tracking) writing to one MLflow run.

    It holds the run id and calls MlflowClient, not the fluent API, so it works from any thread (Prefect
    may run a task in a worker thread, where MLflow's thread-local active run is not set).
    """

    def __init__(self, run_id: str | None = None):
        import mlflow

        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise VimError("MlflowTracker needs a run: pass run_id or open stage_run() first")
            run_id = active.info.run_id
        self.run_id = run_id
        self.client = client()
        self._params: dict[str, str] = {}

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

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
            chunk = items[i : i + PARAMS_PER_BATCH]
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
        self._params.update(new)

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            number = _as_float(value)
            if number is None:
                log.debug("metric %s=%r is not a number; skipped", key, value)
                continue
            batch.append(Metric(sanitize_key(key), number, now, int(step)))
        for i in range(0, len(batch), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        """A file or folder; `name` is its path inside the run's artifacts (default: its own name)."""
        src = Path(path)
        if src.is_dir():
            self.client.log_artifacts(self.run_id, str(src), artifact_path=name or src.name)
            return
        dest = Path(name) if name else Path(src.name)
        folder = None if str(dest.parent) == "." else dest.parent.as_posix()
        if dest.name == src.name:
            self.client.log_artifact(self.run_id, str(src), artifact_path=folder)
            return
        with tempfile.TemporaryDirectory() as tmp:  # MLflow names the artifact after the local file
            renamed = Path(tmp) / dest.name
            shutil.copy2(src, renamed)
            self.client.log_artifact(self.run_id, str(renamed), artifact_path=folder)

    def log_image(self, image: str | Path | np.ndarray, name: str) -> None:
        """A uint8 array or an image file, stored as images/<name>.png (or the file's own suffix)."""
        if isinstance(image, str | Path):
            src = Path(image)
            stem = name if Path(name).suffix else f"{name}{src.suffix}"
            self.log_artifact(src, f"images/{stem}")
            return
        if hasattr(image, "detach"):
            image = image.detach().cpu().numpy()
        file = name if name.endswith(".png") else f"{name}.png"
        self.client.log_image(self.run_id, _hwc(image), artifact_file=f"images/{file}")


class _Discard(NullTracker):
    """What stage_run yields when tracking is off: vim_core's NullTracker, with no run."""

    run_id = None


def tracker_for(run_id: str | None) -> Tracker:
    """The tracker a task hands to a trainer: MLflow for a run id, else one that discards everything.

    Tasks take the run id rather than the tracker, so Prefect sees a plain string as the task input.
    """
    return MlflowTracker(run_id) if run_id else _Discard()


def set_run_tags(run_id: str | None, tags: dict) -> None:
    """Tags on a run; nothing when tracking is off (run_id None)."""
    if run_id:
        c = client()
        for key, value in _clean_tags(tags).items():
            c.set_tag(run_id, key, value)


def log_json_metrics(tracker: Tracker, path: str | Path, step: int = 0) -> None:
    """A stage's metrics JSON: its numbers as run metrics (nested keys joined by '/'), the file as artifact."""
    path = Path(path)
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    tracker.log_metrics(_numbers(data), step)
    tracker.log_artifact(path, f"metrics/{path.name}")


def _numbers(data: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key == "definitions":  # how each metric was computed (sample counts, seeds): not measurements
            continue
        if isinstance(value, dict):
            out.update(_numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out


def log_stage_outputs(tracker: Tracker, stage: str, dvc_yaml: str | Path = "dvc.yaml") -> None:
    """What dvc.yaml declares as the stage's metrics and plots: numbers as metrics, PNGs as images, CSVs
    as artifacts. Reading dvc.yaml keeps MLflow and `dvc metrics/plots` showing the same files."""
    import yaml

    dvc_yaml = Path(dvc_yaml)
    if not dvc_yaml.is_file():
        return
    spec = (yaml.safe_load(dvc_yaml.read_text()).get("stages") or {}).get(stage) or {}
    root = dvc_yaml.parent
    for entry in spec.get("metrics", []):
        log_json_metrics(tracker, root / _out_path(entry))
    for entry in spec.get("plots", []):
        path = root / _out_path(entry)
        if not path.is_file():
            continue
        if path.suffix.lower() == ".png":
            tracker.log_image(path, path.stem)
        else:
            tracker.log_artifact(path, f"plots/{path.name}")


def _out_path(entry) -> str:
    """A dvc.yaml output entry: a path, or {path: options}."""
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


# ---- runs


def _params_dict(params) -> dict:
    if params is None:
        return {}
    if hasattr(params, "model_dump"):
        return params.model_dump(mode="json")
    return dict(params)


def _clean_tags(tags: dict | None) -> dict[str, str]:
    return {sanitize_key(k): str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}


@contextmanager
def pipeline_run(name: str, tags: dict | None = None) -> Iterator[str]:
    """One parent run for a pipeline execution; stage processes started inside nest under it.

    Yields the run id. While open, VIM_PARENT_RUN_ID and MLFLOW_TRACKING_URI are exported to this
    process's environment, which subprocesses (dvc repro / dvc exp run, then each stage) inherit; the
    explicit URI keeps a `dvc exp run --temp` workspace on the same store. Both are restored on exit.
    The run ends FINISHED, or FAILED when the block raises.
    """
    import mlflow

    uri = configure()
    check_reachable(uri)
    exp_id = ensure_experiment()
    all_tags = {"vim.kind": "pipeline", **revision_tags(), **_clean_tags(tags)}
    saved = {k: os.environ.get(k) for k in (PARENT_ENV, "MLFLOW_TRACKING_URI")}
    with mlflow.start_run(run_name=name, experiment_id=exp_id, tags=all_tags) as run:
        os.environ[PARENT_ENV] = run.info.run_id
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            yield run.info.run_id
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextmanager
def stage_run(stage_name: str, params=None) -> Iterator[MlflowTracker]:
    """A run for one stage, nested under VIM_PARENT_RUN_ID when set; yields its MlflowTracker.

    `params` (a dict or a pydantic model) is logged flattened. The run carries the stage name and the
    git/DVC revision as tags, and ends FINISHED, or FAILED when the block raises.
    """
    if not enabled():
        yield _Discard()
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure()
    check_reachable(uri)
    parent = os.environ.get(PARENT_ENV) or None
    if parent:
        try:
            exp_id = client().get_run(parent).info.experiment_id
        except MlflowException as err:
            raise VimError(
                f"{PARENT_ENV}={parent} names no run on {_redact(uri)}; unset it or run the pipeline "
                f"through its flow ({err.error_code})"
            ) from None
    else:
        exp_id = ensure_experiment()
    tags = {"vim.kind": "stage", "vim.stage": stage_name, **revision_tags()}
    # nested=True: an in-process pipeline_run() may be active in this thread; it is then the parent.
    with mlflow.start_run(
        run_name=stage_name, experiment_id=exp_id, parent_run_id=parent, nested=True, tags=tags
    ) as run:
        tracker = MlflowTracker(run.info.run_id)
        tracker.log_params(_params_dict(params))
        yield tracker
