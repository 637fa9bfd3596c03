"""A run's tracking calls, delivered in order, held while the MLflow server is away and replayed on its return.

MLflow's client retries a failed call for minutes and then raises, so a server restart in the middle of a
stage would first stall its training and then kill it. Here each call goes out with MLflow's retries off
(mlflow_run.quick_http). One that fails because the server is away (mlflow_run.is_outage: refused or
reset connection, timeout, HTTP 5xx) waits in an in-memory queue, and every later call of the run queues
behind it, so the run's history keeps its order. Before a later call, at most every PROBE_EVERY seconds,
a /health probe decides whether to replay the queue. A call MLflow refuses (HTTP 4xx, bad input) is never
retried: sent directly it raises, replayed it is dropped with an error line.

close() flushes what is left with backoff for VIM_TRACKING_FLUSH seconds. What the server still did not
take is persisted (atomically) under .vim/outbox/<run id>/ beside the stage's outputs (VIM_OUTBOX_DIR
moves it): the calls as JSON lines, with copies of the files they name. The stage reports them in one
warning line (flows.tracking.stage_run) and keeps its outputs. replay_persisted() delivers them, in order,
once the server answers: every stage does it when it opens its run, and `python -m flows.tracking flush`
does it on demand. Files a queued call names are copied when it is queued, as the trainer may rewrite them.
"""

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from flows import mlflow_run
from vim_core.errors import TransientError
from vim_core.io import atomic_dir, atomic_write_text
from vim_core.redact import redact_url

log = logging.getLogger("vim.tracking")

PROBE_EVERY = 3.0  # seconds between /health probes while calls wait
FLUSH_ENV = "VIM_TRACKING_FLUSH"
DEFAULT_FLUSH_S = 45.0
DIR_ENV = "VIM_OUTBOX_DIR"


# A training rank spawned by its stage (flows.ranks) holds calls of the stage's run in a process of its
# own: it keeps them in a folder of its own ("<run id>-rank0"), so the stage's keep does not replace it.
FOLDER_SUFFIX = ""


def outbox_dir() -> Path:
    """Where undelivered calls are persisted: VIM_OUTBOX_DIR, else .vim/outbox in the repo root."""
    return Path(os.environ.get(DIR_ENV) or mlflow_run.REPO / ".vim" / "outbox")


@dataclass
class _Call:
    op: tuple[str, dict]  # (name, arguments), as apply_op takes them: data, so it can be persisted
    files: tuple[str, ...]
    what: str


def apply_op(client, run_id: str, name: str, args: dict, files: tuple[str, ...]) -> None:
    """Make one tracking call described as data (what Outbox.send's `op` and the persisted file hold)."""
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


class Outbox:
    """The tracking calls of one run; send() never waits on an absent server for more than one quick try."""

    def __init__(self, run_id: str, uri: str | None = None):
        self.run_id = run_id
        self.uri = uri or mlflow_run.tracking_uri()
        self._client = None
        self._queue: deque[_Call] = deque()
        self._lock = threading.RLock()
        self._next_probe = 0.0
        self._spool: Path | None = None
        self.persisted: Path | None = None  # where close() kept what the server did not take

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_run.client()
        return self._client

    @property
    def pending(self) -> int:
        return len(self._queue)

    def send(self, what: str, op: tuple[str, dict], *files: str) -> None:
        """Make the call `op` (name, arguments; see apply_op) now, or queue it behind calls the server has
        not taken yet; `what` names it in log lines."""
        with self._lock:
            if self._queue:
                self._queue.append(self._held(op, files, what))
                self._replay_if_due()
                return
            try:
                self._call(op, files)
            except Exception as err:
                if not mlflow_run.is_outage(err, self.uri):
                    raise
                log.info(
                    "MLflow tracking server %s did not take %s (%s); holding tracking calls until it answers",
                    redact_url(self.uri),
                    what,
                    _first_line(err),
                )
                self._queue.append(self._held(op, files, what))
                self._next_probe = time.monotonic() + PROBE_EVERY

    def close(self, within: float | None = None) -> int:
        """Deliver what waits, retrying with backoff for `within` seconds (VIM_TRACKING_FLUSH); return the
        number of calls not delivered. Those are persisted under outbox_dir() for a later replay (see
        self.persisted); the spooled copies are dropped either way."""
        if within is None:
            within = mlflow_run.seconds_from_env(FLUSH_ENV, DEFAULT_FLUSH_S)
        with self._lock:
            sleeps = mlflow_run.backoff(within)
            while self._queue:
                self._next_probe = 0.0
                self._replay_if_due()
                pause = next(sleeps, None) if self._queue else None
                if pause is None:
                    break
                time.sleep(pause)
            left = len(self._queue)
            if left:
                self.persisted = self._persist()
            self._queue.clear()
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)
                self._spool = None
            with _open_lock:
                _open.pop(self.run_id, None)
            return left

    def _call(self, op: tuple[str, dict], files) -> None:
        """One quick try, and a second one at once if the connection broke: after a server restart the
        first request may go out on a pooled connection the old server closed."""
        for last in (False, True):
            try:
                with mlflow_run.quick_http():
                    return apply_op(self.client, self.run_id, *op, files)
            except Exception as err:
                if last or not _broken_connection(err):
                    raise

    # ---- the queue

    def _persist(self) -> Path:
        """The held calls as JSON lines (and their files) in outbox_dir()/<run id>, written atomically."""
        import numpy as np

        folder = outbox_dir() / f"{self.run_id}{FOLDER_SUFFIX}"
        with atomic_dir(folder) as tmp:
            lines = []
            for i, call in enumerate(self._queue):
                name, args = call.op
                files = list(call.files)
                if "pixels" in args:  # an image held in memory: kept as .npy, never pickled
                    args = {k: v for k, v in args.items() if k != "pixels"}
                    files = [f"{i}.npy"]
                    np.save(tmp / files[0], np.asarray(call.op[1]["pixels"]), allow_pickle=False)
                else:
                    for j, src in enumerate(map(Path, call.files)):
                        dst = tmp / f"{i}-{j}" / src.name
                        dst.parent.mkdir()
                        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
                        files[j] = str(dst.relative_to(tmp))
                lines.append(json.dumps({"op": name, "args": args, "files": files, "what": call.what}))
            meta = {"run_id": self.run_id, "uri": redact_url(self.uri), "calls": len(lines)}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            (tmp / "calls.jsonl").write_text("".join(line + "\n" for line in lines))
        return folder

    def _held(self, op, files, what) -> _Call:
        if not files:
            return _Call(op, (), what)
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="vim-mlflow-outbox-"))
        copies = []
        for src in map(Path, files):
            dst = Path(tempfile.mkdtemp(dir=self._spool)) / src.name  # keeps the name MLflow stores it under
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
            copies.append(str(dst))
        return _Call(op, tuple(copies), what)

    def _replay_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + PROBE_EVERY
        try:
            mlflow_run.check_reachable(self.uri, timeout=2.0)
        except TransientError:
            return
        delivered = 0
        while self._queue:
            call = self._queue[0]
            try:
                self._call(call.op, call.files)
            except Exception as err:
                if mlflow_run.is_outage(err, self.uri):
                    break
                log.error(
                    "MLflow refused the held %s of run %s: %s", call.what, self.run_id, _first_line(err)
                )
            self._queue.popleft()
            delivered += 1
        if delivered:
            log.info(
                "MLflow tracking server %s answers again: delivered %d held calls, %d still held",
                redact_url(self.uri),
                delivered,
                len(self._queue),
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
    """Deliver the calls persisted under outbox_dir(), run by run and in order, to the tracking server
    (the current MLFLOW_TRACKING_URI; runs persisted for another server are left alone). A call MLflow
    refuses is dropped with an error line, as a held call is; at an outage the rest stays for next time.
    Returns counts: delivered, refused, left, runs (fully replayed), and other_server (runs skipped)."""
    root = outbox_dir()
    counts = {"delivered": 0, "refused": 0, "left": 0, "runs": 0, "other_server": 0}
    folders = sorted(p for p in root.iterdir() if (p / "calls.jsonl").is_file()) if root.is_dir() else []
    if not folders:
        return counts
    uri = uri or mlflow_run.tracking_uri()
    client = mlflow_run.client()
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        lines = (folder / "calls.jsonl").read_text().splitlines()
        if meta.get("uri") != redact_url(uri):
            counts["other_server"] += 1
            counts["left"] += len(lines)
            continue
        done = 0
        for line in lines:
            call = json.loads(line)
            files = tuple(str(folder / f) for f in call["files"])
            try:
                with mlflow_run.quick_http():
                    apply_op(client, meta["run_id"], call["op"], call["args"], files)
                counts["delivered"] += 1
            except Exception as err:
                if mlflow_run.is_outage(err, uri):
                    break
                counts["refused"] += 1
                log.error(
                    "MLflow refused the kept %s of run %s: %s", call["what"], meta["run_id"], _first_line(err)
                )
            done += 1
        if done == len(lines):
            shutil.rmtree(folder, ignore_errors=True)
            counts["runs"] += 1
        else:
            atomic_write_text(folder / "calls.jsonl", "".join(line + "\n" for line in lines[done:]))
            counts["left"] += len(lines) - done
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
