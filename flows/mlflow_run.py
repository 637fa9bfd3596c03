"""MLflow runs: where they go, what they are tagged with, and one parent run per pipeline execution.

Each DVC stage is its own process, so a stage cannot see the pipeline's run through MLflow's
(thread-local) active-run stack. pipeline_run() exports the parent run id as VIM_PARENT_RUN_ID, together
with the resolved MLFLOW_TRACKING_URI, and every stage process started beneath it (dvc repro, dvc exp run)
opens its stage run (start_stage_run) as a nested run of that parent. A stage run with no parent in the
environment (a bare `dvc repro`) is a top-level run of the same experiment.

The embedded default is a sqlite store `mlflow.db` in the repo root with artifacts under `mlartifacts/`
(both git-ignored); MLFLOW_TRACKING_URI points everything at a server instead. VIM_TRACKING=off turns
MLflow off (see enabled()). What goes into a run is flows/tracking.py's MlflowTracker; how its calls
survive a server outage is flows/outbox.py.

A server that is down when a stage starts is waited for (VIM_TRACKING_WAIT seconds, default 60: a
restarting `mlflow server` takes 11-25 s to answer on 2 cores); if it never answers the stage fails in one
line (TransientError) before any work.
"""

import hashlib
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows import vcs
from vim_core.errors import TransientError, VimError
from vim_core.redact import redact_text, redact_url

REPO = Path(__file__).resolve().parents[1]
PARENT_ENV = "VIM_PARENT_RUN_ID"
SWITCH_ENV = "VIM_TRACKING"
DEFAULT_EXPERIMENT = "vim"
WAIT_ENV = "VIM_TRACKING_WAIT"
DEFAULT_WAIT_S = 60.0

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
    raise TransientError(f"MLflow tracking server {redact_url(uri)} did not answer ({reason})")


def seconds_from_env(name: str, default: float) -> float:
    """A non-negative number of seconds from the environment; a bad value is a one-line VimError."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise VimError(f"{name}={raw!r} is not a number of seconds >= 0")
    return value


def backoff(within: float, first: float = 1.0, most: float = 8.0) -> Iterator[float]:
    """Sleeps of 1, 2, 4, 8, 8 ... seconds, cut to end at `within` seconds from now; then stops."""
    deadline = time.monotonic() + within
    delay = first
    while (left := deadline - time.monotonic()) > 0:
        yield min(delay, left)
        delay = min(delay * 2, most)


def wait_reachable(uri: str | None = None, within: float | None = None) -> None:
    """check_reachable, retried with backoff for `within` seconds (VIM_TRACKING_WAIT): a server that is
    restarting is waited for; one that never answers is a one-line TransientError that says for how long."""
    uri = uri or tracking_uri()
    within = seconds_from_env(WAIT_ENV, DEFAULT_WAIT_S) if within is None else within
    sleeps = backoff(within)
    while True:
        try:
            return check_reachable(uri)
        except TransientError as err:
            pause = next(sleeps, None)
            if pause is None:
                raise TransientError(f"{err} within {within:g} s (set {WAIT_ENV} to wait longer)") from None
            time.sleep(pause)


# MLflow's client retries a failed call for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 with backoff 2):
# a tracking call on the training thread must fail fast instead, and flows/outbox.py retries it later.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def quick_http() -> Iterator[None]:
    """MLflow HTTP calls in this block: no retries, 10 s timeout. MLflow reads these variables at each
    call and has no per-client setting, so they are set in os.environ for the block (and restored)."""
    saved = {k: os.environ.get(k) for k in QUICK_HTTP}
    os.environ.update(QUICK_HTTP)
    try:
        yield
    finally:
        restore_env(saved)


def restore_env(saved: dict[str, str | None]) -> None:
    """Put environment variables back as `saved` holds them (None: was unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def is_outage(err: BaseException, uri: str | None = None) -> bool:
    """Whether a failed MLflow call failed because the server is away, not because of what was sent.

    The server's own 5xx answers count; an HTTP 4xx (bad input) does not. MLflow reports a refused or
    reset connection and a timeout as a plain MlflowException with a 500 code, like some client-side
    errors, so for those a /health probe decides.
    """
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(err, RestException):
        return err.get_http_status_code() >= 500
    if isinstance(err, requests.HTTPError):  # artifact uploads
        return err.response is None or err.response.status_code >= 500
    if isinstance(err, MlflowException):
        if err.get_http_status_code() < 500:
            return False
    elif not isinstance(err, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError):
        return False
    try:
        check_reachable(uri, timeout=2.0)
    except TransientError:
        return True
    return False


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
    """Tags as MLflow takes them, with any URL's credentials redacted (vim_core.redact)."""
    return {sanitize_key(k): redact_text(str(v))[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}


def _git(*args: str) -> str | None:
    try:
        return vcs.git(*args, cwd=REPO).strip()
    except VimError:  # not a git checkout, or no git: the tags are left out
        return None


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
            restore_env(saved)


def open_stage_run(stage_name: str) -> str:
    """Create a run for one stage, nested under VIM_PARENT_RUN_ID when set, as this thread's active run;
    return its id. The caller ends it (flows.tracking.stage_run, through the run's outbox).

    The run carries the stage name and the git/DVC revision as tags. A server that does not answer is
    waited for (wait_reachable), so a restart between stages is fine; one that stays away is a one-line
    TransientError before any work.
    """
    from mlflow.exceptions import MlflowException

    uri = configure()
    wait_reachable(uri)
    reason = ""
    for pause in (2.0, 4.0, 0.0):  # it answered /health: a few quick tries, in case it went away again
        try:
            with quick_http():
                return _create_stage_run(stage_name, uri)
        except MlflowException as err:
            if not is_outage(err, uri):
                raise
            reason = str(err).splitlines()[0][:200]
        time.sleep(pause)
    raise TransientError(
        f"MLflow tracking server {redact_url(uri)} did not create the {stage_name} run ({reason})"
    )


def _create_stage_run(stage_name: str, uri: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    parent = os.environ.get(PARENT_ENV) or None
    if parent:
        try:
            exp_id = client().get_run(parent).info.experiment_id
        except MlflowException as err:
            if is_outage(err, uri):
                raise
            raise VimError(
                f"{PARENT_ENV}={parent} names no run on {redact_url(uri)}; unset it or run the pipeline "
                f"through its flow ({err.error_code})"
            ) from None
    else:
        exp_id = ensure_experiment()
    tags = {"vim.kind": "stage", "vim.stage": stage_name, **revision_tags()}
    # nested=True: an in-process pipeline_run() may be active in this thread; it is then the parent.
    run = mlflow.start_run(
        run_name=stage_name, experiment_id=exp_id, parent_run_id=parent, nested=True, tags=tags
    )
    return run.info.run_id
