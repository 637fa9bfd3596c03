"""Real servers on 127.0.0.1 for integration tests, started once per session."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def start(
    cmd: list[str],
    url: str,
    log: Path,
    env: dict | None = None,
    timeout: float = 90.0,
    cwd: Path | None = None,
):
    """Start a server in its own process group (so stop() also ends its workers); wait for `url`."""
    with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    try:
        wait_http(url, proc, timeout)
    except Exception:
        stop(proc)
        raise
    return proc


@contextlib.contextmanager
def model_server(model_uri: str, log: Path, env: dict | None = None, timeout: float = 240.0):
    """A real `mlflow models serve` of `model_uri` on a free loopback port; yields its base URL.

    One worker, the venv's own packages (`--env-manager local`); `env` is added to this process's.
    """
    port = free_port()
    cmd = [
        str(BIN / "mlflow"), "models", "serve", "-m", model_uri,
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    env = {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # mlflow execs `uvicorn` from PATH
        **(env or {}),
    }
    proc = start(cmd, f"{url}/ping", log, env=env, timeout=timeout)
    try:
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `timeout` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout)


def kill(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL the server's process group at once, as a crash would; its port is free on return."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout)


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """Prefect settings for a test process: its own home and database, no analytics, no banners."""
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_prefect(root: Path, timeout: float = 150.0):
    """`prefect server start` on a free loopback port, state under `root`; returns (url, process).

    Takes 16-42 s on 2 cores. The UI is at url + "/", the API at url + "/api".
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # The UI asks /ui-settings where the API is, and that says port 4200 unless told otherwise.
    env = {**prefect_env(root), "PREFECT_UI_API_URL": f"{url}/api"}
    proc = start(cmd, f"{url}/api/health", root / "prefect-server.log", env=env, timeout=timeout)
    return url, proc
