"""A run's tracking calls, delivered in order, held while the MLflow server is away and replayed on its return.

MLflow's client retries a failed call for minutes and then raises, so a server restart in the middle of a
stage would first stall its training and then kill it. Here each call goes out with MLflow's retries off
(mlflow_run.quick_http). One that fails because the server is away (mlflow_run.is_outage: refused or
reset connection, timeout, HTTP 5xx) waits in an in-memory queue, and every later call of the run queues
behind it, so the run's history keeps its order. Before a later call, at most every PROBE_EVERY seconds,
a /health probe decides whether to replay the queue. A call MLflow refuses (HTTP 4xx, bad input) is never
retried: sent directly it raises, replayed it is dropped with an error line.

close() flushes what is left with backoff for VIM_TRACKING_FLUSH seconds and returns how many calls it
could not deliver; the stage reports those in one warning line (flows.tracking.stage_run) and keeps its
outputs. Files a queued call names are copied when it is queued, as the trainer may rewrite them.
"""

import atexit
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flows import mlflow_run
from vim_core.errors import TransientError

log = logging.getLogger("vim.tracking")

PROBE_EVERY = 3.0  # seconds between /health probes while calls wait
FLUSH_ENV = "VIM_TRACKING_FLUSH"
DEFAULT_FLUSH_S = 45.0


@dataclass
class _Call:
    fn: Callable[..., object]  # fn(client, *files)
    files: tuple[str, ...]
    what: str


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

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_run.client()
        return self._client

    @property
    def pending(self) -> int:
        return len(self._queue)

    def send(self, fn: Callable[..., object], *files: str, what: str = "call") -> None:
        """Call fn(client, *files) now, or queue it behind calls the server has not taken yet."""
        with self._lock:
            if self._queue:
                self._queue.append(self._held(fn, files, what))
                self._replay_if_due()
                return
            try:
                self._call(fn, files)
            except Exception as err:
                if not mlflow_run.is_outage(err, self.uri):
                    raise
                log.info(
                    "MLflow tracking server %s did not take %s (%s); holding tracking calls until it answers",
                    mlflow_run._redact(self.uri),
                    what,
                    _first_line(err),
                )
                self._queue.append(self._held(fn, files, what))
                self._next_probe = time.monotonic() + PROBE_EVERY

    def close(self, within: float | None = None) -> int:
        """Deliver what waits, retrying with backoff for `within` seconds (VIM_TRACKING_FLUSH); return the
        number of calls not delivered. Drops the spooled copies either way."""
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
            self._queue.clear()
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)
                self._spool = None
            with _open_lock:
                _open.pop(self.run_id, None)
            return left

    def _call(self, fn, files) -> None:
        """One quick try, and a second one at once if the connection broke: after a server restart the
        first request may go out on a pooled connection the old server closed."""
        try:
            with mlflow_run.quick_http():
                fn(self.client, *files)
            return
        except Exception as err:
            if not _broken_connection(err):
                raise
        with mlflow_run.quick_http():
            fn(self.client, *files)

    # ---- the queue

    def _held(self, fn, files, what) -> _Call:
        if not files:
            return _Call(fn, (), what)
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
        return _Call(fn, tuple(copies), what)

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
                self._call(call.fn, call.files)
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
                mlflow_run._redact(self.uri),
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
    return (
        f"warning: MLflow tracking server {mlflow_run._redact(box.uri)} did not answer: {undelivered} "
        f"tracking calls of {of} were not delivered (the run stays RUNNING there); the outputs are complete"
    )


@atexit.register
def _close_the_rest() -> None:
    """Runs no stage closed (a tracker_for(run_id) outside stage_run) get a last flush at exit."""
    for box in list(_open.values()):
        if box.pending:
            left = box.close()
            if left:
                print(warning_line(box, left), file=sys.stderr)
