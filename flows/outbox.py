"""A run's tracking calls, delivered in order; from the first one the MLflow server does not take, kept in a
journal on disk and replayed from there when the server answers again.

MLflow's client retries a failed call for minutes and then raises, so a server restart in the middle of a
stage would first stall its training and then kill it. Here each call goes out with MLflow's retries off
(mlflow_run.quick_http). One that fails because the server is away (mlflow_run.is_outage: refused or
reset connection, timeout, HTTP 5xx) starts the run's journal, .vim/outbox/<run id>/ (VIM_OUTBOX_DIR moves
it): the calls as JSON lines, with copies of the files they name made when the call is held (the trainer
may rewrite them). Every later call of the run is appended behind it, so the run's history keeps its
order. Before a later call, at most every PROBE_EVERY seconds, a /health probe decides whether to replay
the journal. A call MLflow refuses (HTTP 4xx, bad input) is never retried: sent directly it raises,
replayed it is dropped with an error line.

close() replays what is left with backoff for VIM_TRACKING_FLUSH seconds. What the server still did not
take stays in the journal; the stage reports it in one warning line (flows.tracking.stage_run) and keeps
its outputs. A journal is on disk from its first call, so a stage killed during an outage loses none of
them either. replay_persisted() delivers the journals no live process holds (each holder keeps an flock
on it), in order, once the server answers: every stage does it when it opens its run, and
`python -m flows.tracking flush` does it on demand.
"""

import atexit
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from flows import mlflow_run
from vim_core.errors import TransientError
from vim_core.io import atomic_write_text
from vim_core.redact import redact_url

log = logging.getLogger("vim.tracking")

PROBE_EVERY = 3.0  # seconds between /health probes while calls wait
FLUSH_ENV = "VIM_TRACKING_FLUSH"
DEFAULT_FLUSH_S = 45.0
DIR_ENV = "VIM_OUTBOX_DIR"
CALLS, META, LOCK = "calls.jsonl", "meta.json", ".lock"

# A training rank spawned by its stage (flows.ranks) holds calls of the stage's run in a process of its
# own: it keeps them in a journal of its own ("<run id>-rank0"), beside the stage's.
FOLDER_SUFFIX = ""


def outbox_dir() -> Path:
    """Where the journals are: VIM_OUTBOX_DIR, else .vim/outbox in the repo root."""
    return Path(os.environ.get(DIR_ENV) or mlflow_run.REPO / ".vim" / "outbox")


def apply_op(client, run_id: str, name: str, args: dict, files: tuple[str, ...]) -> None:
    """Make one tracking call described as data (what Outbox.send's `op` and a journal line hold)."""
    if name == "log_batch":
        from mlflow.entities import Metric, Param

        metrics = [Metric(*m) for m in args.get("metrics", [])]
        client.log_batch(run_id, metrics=metrics, params=[Param(*p) for p in args.get("params", [])])
    elif name == "set_tag":
        client.set_tag(run_id, args["key"], args["value"])
    elif name == "set_terminated":
        client.set_terminated(run_id, args["status"])
    elif name == "log_artifact":
        client.log_artifact(run_id, files[0], artifact_path=args.get("artifact_path"))
    elif name == "log_artifacts":
        client.log_artifacts(run_id, files[0], artifact_path=args.get("artifact_path"))
    elif name == "log_image":
        import numpy as np

        pixels = args["pixels"] if "pixels" in args else np.load(files[0], allow_pickle=False)
        client.log_image(run_id, pixels, artifact_file=args["artifact_file"])
    else:
        raise ValueError(f"unknown tracking call {name!r}")


def _send(client, run_id: str, name: str, args: dict, files) -> None:
    """One quick try, and a second one at once if the connection broke: after a server restart the first
    request may go out on a pooled connection the old server closed."""
    for last in (False, True):
        try:
            with mlflow_run.quick_http():
                return apply_op(client, run_id, name, args, files)
        except Exception as err:
            if last or not _broken_connection(err):
                raise


def _deliver(folder: Path, client, uri: str) -> dict[str, int]:
    """Replay a journal in order until the server is away again; what it took (or refused: dropped with
    an error line) leaves the journal, and an emptied journal is removed. Returns the counts."""
    run_id = json.loads((folder / META).read_text())["run_id"]
    lines = (folder / CALLS).read_text().splitlines()
    counts = {"delivered": 0, "refused": 0, "left": 0}
    done = 0
    for line in lines:
        try:
            call = json.loads(line)
        except json.JSONDecodeError:  # the last line, cut short by a kill while it was written
            done += 1
            continue
        try:
            _send(client, run_id, call["op"], call["args"], tuple(str(folder / f) for f in call["files"]))
            counts["delivered"] += 1
        except Exception as err:
            if mlflow_run.is_outage(err, uri):
                break
            counts["refused"] += 1
            log.error("MLflow refused the held %s of run %s: %s", call["what"], run_id, _first_line(err))
        done += 1
    counts["left"] = len(lines) - done
    if counts["left"]:
        atomic_write_text(folder / CALLS, "".join(line + "\n" for line in lines[done:]))
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return counts


class Outbox:
    """The tracking calls of one run; send() never waits on an absent server for more than one quick try."""

    def __init__(self, run_id: str, uri: str | None = None):
        self.run_id = run_id
        self.uri = uri or mlflow_run.tracking_uri()
        self._client = None
        self._lock = threading.RLock()
        self._next_probe = 0.0
        self._held = 0  # calls in the journal
        self._owner = None  # the open journal's flock, held while this process appends to it
        self.persisted: Path | None = None  # the journal close() left for a later replay

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_run.client()
        return self._client

    @property
    def folder(self) -> Path:
        return outbox_dir() / f"{self.run_id}{FOLDER_SUFFIX}"

    @property
    def pending(self) -> int:
        return self._held

    def send(self, what: str, op: tuple[str, dict], *files: str) -> None:
        """Make the call `op` (name, arguments; see apply_op) now, or append it to the journal behind calls
        the server has not taken yet; `what` names it in log lines."""
        with self._lock:
            if self._held:
                self._hold(what, op, files)
                self._replay_if_due()
                return
            try:
                _send(self.client, self.run_id, *op, files)
            except Exception as err:
                if not mlflow_run.is_outage(err, self.uri):
                    raise
                log.info(
                    "MLflow tracking server %s did not take %s (%s); holding tracking calls until it answers",
                    redact_url(self.uri),
                    what,
                    _first_line(err),
                )
                self._hold(what, op, files)
                self._next_probe = time.monotonic() + PROBE_EVERY

    def close(self, within: float | None = None) -> int:
        """Replay what waits, retrying with backoff for `within` seconds (VIM_TRACKING_FLUSH); return the
        number of calls not delivered, left in the journal (self.persisted) for a later replay."""
        if within is None:
            within = mlflow_run.seconds_from_env(FLUSH_ENV, DEFAULT_FLUSH_S)
        with self._lock:
            sleeps = mlflow_run.backoff(within)
            while self._held:
                self._next_probe = 0.0
                self._replay_if_due()
                pause = next(sleeps, None) if self._held else None
                if pause is None:
                    break
                time.sleep(pause)
            left = self._held
            self.persisted = self.folder if left else None
            self._release()  # the journal is anyone's to replay now
            with _open_lock:
                _open.pop(self.run_id, None)
            return left

    def _hold(self, what: str, op: tuple[str, dict], files) -> None:
        """Append the call to the journal (started on the first), after copies of the files it names."""
        import numpy as np

        folder = self.folder
        if self._owner is None:  # no journal yet, or the last one was replayed whole and removed
            folder.mkdir(parents=True, exist_ok=True)
            self._owner = open(folder / LOCK, "w")  # noqa: SIM115 (held open until close())
            fcntl.flock(self._owner, fcntl.LOCK_EX)
            meta = {"run_id": self.run_id, "uri": redact_url(self.uri)}
            atomic_write_text(folder / META, json.dumps(meta) + "\n")
        name, args = op
        kept = []
        if "pixels" in args:  # an image held in memory: kept as .npy, never pickled
            copy = Path(tempfile.mkdtemp(dir=folder)) / "image.npy"
            np.save(copy, np.asarray(args["pixels"]), allow_pickle=False)
            args, kept = {k: v for k, v in args.items() if k != "pixels"}, [copy]
        for src in map(Path, files):
            copy = Path(tempfile.mkdtemp(dir=folder)) / src.name  # the name MLflow stores it under
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, copy)
            kept.append(copy)
        record = {"op": name, "args": args, "files": [str(p.relative_to(folder)) for p in kept], "what": what}
        with open(folder / CALLS, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._held += 1

    def _release(self) -> None:
        """Let go of the journal's flock (closing its file), if this process holds one."""
        if self._owner is not None:
            self._owner.close()
            self._owner = None

    def _replay_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + PROBE_EVERY
        try:
            mlflow_run.check_reachable(self.uri, timeout=2.0)
        except TransientError:
            return
        counts = _deliver(self.folder, self.client, self.uri)
        self._held = counts["left"]
        if not self._held:  # _deliver removed the emptied journal
            self._release()
        if counts["delivered"] or counts["refused"]:
            log.info(
                "MLflow tracking server %s answers again: delivered %d held calls, %d still held",
                redact_url(self.uri),
                counts["delivered"] + counts["refused"],
                self._held,
            )


def _broken_connection(err: BaseException) -> bool:
    """A refused, reset or aborted connection (MLflow wraps these in a plain MlflowException), not a
    timeout: a server that hangs should cost one timeout per call, not two."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(err, RestException) or "timeout" in str(err).lower():
        return False
    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return isinstance(err, requests.ConnectionError | ConnectionError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


_open: dict[str, Outbox] = {}
_open_lock = threading.Lock()


def outbox(run_id: str) -> Outbox:
    """The run's one outbox in this process: every tracker of a run queues behind the same calls."""
    with _open_lock:
        box = _open.get(run_id)
        if box is None:
            box = _open[run_id] = Outbox(run_id)
        return box


def warning_line(box: Outbox, undelivered: int, stage: str | None = None) -> str:
    of = f"the {stage} run {box.run_id}" if stage else f"run {box.run_id}"
    kept = ""
    if box.persisted is not None:
        kept = f"; kept in {box.persisted} for the next stage or `python -m flows.tracking flush`"
    return (
        f"warning: MLflow tracking server {redact_url(box.uri)} did not answer: {undelivered} "
        f"tracking calls of {of} were not delivered (the run stays RUNNING there){kept}; "
        "the outputs are complete"
    )


def replay_persisted(uri: str | None = None) -> dict:
    """Deliver the journals under outbox_dir() that no live process holds, run by run and in order, to the
    tracking server (the current MLFLOW_TRACKING_URI; journals of another server are left alone).
    Returns counts: delivered, refused, left, runs (fully replayed), and the runs skipped: other_server,
    and live (journals a live stage holds and replays itself; their calls count in `left`)."""
    root = outbox_dir()
    counts = {"delivered": 0, "refused": 0, "left": 0, "runs": 0, "other_server": 0, "live": 0}
    folders = sorted(p for p in root.iterdir() if (p / CALLS).is_file()) if root.is_dir() else []
    if not folders:
        return counts
    uri = uri or mlflow_run.tracking_uri()
    client = mlflow_run.client()
    for folder in folders:
        try:
            lock = open(folder / LOCK, "a")  # noqa: SIM115 (closed below)
        except FileNotFoundError:  # its holder replayed and removed it meanwhile
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live stage still appends to it and replays it itself
                skipped = "live"
            else:
                same = json.loads((folder / META).read_text()).get("uri") == redact_url(uri)
                skipped = None if same else "other_server"
            if not (folder / CALLS).is_file():
                continue
            if skipped:
                counts[skipped] += 1
                counts["left"] += len((folder / CALLS).read_text().splitlines())
                continue
            done = _deliver(folder, client, uri)
        for key in ("delivered", "refused", "left"):
            counts[key] += done[key]
        counts["runs"] += not done["left"]
    return counts


@atexit.register
def _close_the_rest() -> None:
    """Runs no stage closed (a tracker_for(run_id) outside stage_run) get a last flush at exit."""
    for box in list(_open.values()):
        if box.pending:
            left = box.close()
            if left:
                print(warning_line(box, left), file=sys.stderr)


def set_run_tags(run_id: str | None, tags: dict) -> None:
    """Tags on a run, through its outbox (held while the server is away); nothing with tracking off."""
    if run_id:
        box = outbox(run_id)
        for key, value in mlflow_run.clean_tags(tags).items():
            box.send(f"tag {key}", ("set_tag", {"key": key, "value": value}))
