"""A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied local artifacts), once per test session.

Import the fixture into tests/conftest.py: `from tests.mlflow_server import mlflow_server  # noqa: F401`.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import servers

# The job runner (huey) is a second process tree that slows start-up and makes a stop take ~20 s.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class MlflowServer:
    url: str
    root: Path  # holds mlflow.db, the artifacts and the log


def start_mlflow(root: Path, timeout: float = 120.0, port: int | None = None):
    """Start the server under `root`; returns (MlflowServer, process). Takes 11-25 s on 2 cores.

    `port` (default: a free one) restarts a stopped server where its clients look, on the same store.
    """
    port = port or servers.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(servers.BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = servers.start(cmd, f"{url}/health", root / "server.log", env=SERVER_ENV, timeout=timeout)
    return MlflowServer(url, root), proc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    server, proc = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    servers.stop(proc)
