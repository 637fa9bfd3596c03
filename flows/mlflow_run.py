"""MLflow runs: where they go, what they are tagged with, and one parent run per pipeline execution.

Each DVC stage is its own process, so a stage cannot see the pipeline's run through MLflow's
(thread-local) active-run stack. pipeline_run() exports the parent run id as VIM_PARENT_RUN_ID, together
with the resolved MLFLOW_TRACKING_URI, and every stage process started beneath it (dvc repro, dvc exp run)
opens its stage run (start_stage_run) as a nested run of that parent. A stage run with no parent in the
environment (a bare `dvc repro`) is a top-level run of the same experiment.

The embedded default is a sqlite store `mlflow.db` in the repo root with artifacts under `mlartifacts/`
(both git-ignored); MLFLOW_TRACKING_URI points everything at a server instead. VIM_TRACKING=off turns
MLflow off (see enabled()). What goes into a run is flows/tracking.py's MlflowTracker.
"""

import hashlib
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vim_core.errors import TransientError, VimError

REPO = Path(__file__).resolve().parents[1]
PARENT_ENV = "VIM_PARENT_RUN_ID"
SWITCH_ENV = "VIM_TRACKING"
DEFAULT_EXPERIMENT = "vim"

# MLflow's limits (mlflow.utils.validation), spelled out so a change there fails a test, not a run.
MAX_KEY = 250
MAX_TAG_VALUE = 8000
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


REGISTRY_ENV = "MLFLOW_REGISTRY_URI"


def configure() -> str:
    """Point MLflow's fluent API at tracking_uri() (and at MLFLOW_REGISTRY_URI for the registry if the user
    set it); return the tracking URI.

    `mlflow.set_registry_uri` also writes MLFLOW_REGISTRY_URI into os.environ, so without the undo below
    the first configure() would pin the registry of this process (and its children) to that tracking
    server for good: a later tracking URI would log runs to one server and register models on the other.
    """
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    own = os.environ.get(REGISTRY_ENV)
    mlflow.set_registry_uri(own or uri)
    if own is None:
        os.environ.pop(REGISTRY_ENV, None)
    return uri


def client():
    from mlflow import MlflowClient

    uri = configure()
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get(REGISTRY_ENV) or uri)


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


# ---- names and tags


def sanitize_key(key: str) -> str:
    """A metric, param or tag name MLflow accepts: allowed characters, no empty/'.'/'..' path parts, <= 250."""
    parts = [_BAD_KEY_CHARS.sub("_", p) for p in str(key).split("/") if p]
    parts = ["_" if p in (".", "..") else p for p in parts]
    name = "/".join(parts) or "_"
    if len(name) > MAX_KEY:  # keep distinct long keys distinct
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_KEY - 9].rstrip('/')}_{digest}"
    return name


def clean_tags(tags: dict | None) -> dict[str, str]:
    return {sanitize_key(k): str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}


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


def set_run_tags(run_id: str | None, tags: dict) -> None:
    """Tags on a run; nothing when tracking is off (run_id None)."""
    if run_id:
        c = client()
        for key, value in clean_tags(tags).items():
            c.set_tag(run_id, key, value)


# ---- runs


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
    all_tags = {"vim.kind": "pipeline", **revision_tags(), **clean_tags(tags)}
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
def start_stage_run(stage_name: str) -> Iterator[str]:
    """A run for one stage, nested under VIM_PARENT_RUN_ID when set; yields its run id.

    The run carries the stage name and the git/DVC revision as tags, and ends FINISHED, or FAILED when
    the block raises.
    """
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
        yield run.info.run_id
