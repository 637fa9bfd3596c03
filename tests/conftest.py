import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests import servers
from tests.mlflow_server import mlflow_server  # noqa: F401  (session-scoped real server)
from tests.reliability import (  # noqa: F401  (reports/reliability.json: its hooks and fixture)
    pytest_configure,
    pytest_deselected,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    record_fault,
)
from vim_core.config import Params
from vim_core.data.prepare import prepare
from vim_core.data.shards import load_split

REPO = Path(__file__).resolve().parents[1]


@dataclass
class S3Endpoint:
    url: str
    key: str
    secret: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        )


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Endpoint:
    """moto's standalone S3 server on loopback, with IAM auth enforced so wrong credentials fail."""
    import boto3

    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # The first three requests (creating the user, its key and its policy) go through unauthenticated.
    proc = servers.start(
        [str(servers.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        f"{url}/moto-api/",
        log,
        env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"},
    )
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="vim-test")
    key = iam.create_access_key(UserName="vim-test")["AccessKey"]
    iam.put_user_policy(
        UserName="vim-test",
        PolicyName="all",
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}',
    )
    yield S3Endpoint(url, key["AccessKeyId"], key["SecretAccessKey"])
    servers.stop(proc)


@pytest.fixture
def s3_env(s3, monkeypatch) -> S3Endpoint:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> str:
    """A real `prefect server start` on loopback (UI and API), once per session; yields its base URL."""
    url, proc = servers.start_prefect(tmp_path_factory.mktemp("prefect"))
    yield url
    servers.stop(proc, timeout=20)


@pytest.fixture(scope="session")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    with np.load(REPO / "vim_core" / "data" / "embedded" / "mnist.npz") as npz:
        return npz["images"], npz["labels"]


@pytest.fixture(scope="session")
def mnist_splits(tmp_path_factory):
    """The embedded default prepared once per session: ((train_x, train_y), (test_x, test_y)), uint8 NCHW."""
    p = Params()
    p.data.out_dir = str(tmp_path_factory.mktemp("data") / "mnist")
    prepare(p.data)
    return load_split(p.data.out_dir, "train"), load_split(p.data.out_dir, "test")


def copy_repo(dst: Path) -> Path:
    """A git checkout of the working tree at `dst` (what repo_copy makes), for fixtures of wider scope."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if rel.split("/")[0] in ("data", "models", ".venv"):  # pipeline outputs are regenerated
            continue
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git_commit(dst, "copy", init=True)
    return dst


def git_commit(repo: Path, message: str, init: bool = False) -> None:
    env = {**os.environ, **GIT_IDENTITY}
    if init:
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=repo, check=True, env=env)


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A git checkout of the working tree in tmp, for tests that run dvc or the stage commands."""
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def stage2(tmp_path_factory) -> Path:
    """A micro tokenizer trained on real MNIST and its token shards (tests.vim_core.transformer.test_transformer_stage params)."""
    from tests.vim_core.transformer.test_transformer_stage import stage2_params
    from vim_core.config import parse_params
    from vim_core.data.prepare import prepare
    from vim_core.tokenizer.encode_dataset import tokenize_dataset
    from vim_core.train.tokenizer_trainer import train_tokenizer

    tmp = tmp_path_factory.mktemp("stage2")
    params = parse_params(stage2_params(tmp))
    prepare(params.data)
    train_tokenizer(params.tokenizer, params.data.out_dir, seed=0)
    tokenize_dataset(str(tmp / "model" / "tokenizer.safetensors"), params.data.out_dir, tmp / "tokens")
    return tmp


@pytest.fixture
def tracking_env(mlflow_server, monkeypatch, request):  # noqa: F811 (the fixture above)
    """The session's MLflow server as this test's tracking URI, in the module's MLFLOW_EXPERIMENT, no run nesting."""
    import mlflow

    from flows import mlflow_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.module.MLFLOW_EXPERIMENT)
    monkeypatch.delenv(mlflow_run.PARENT_ENV, raising=False)
    monkeypatch.delenv(mlflow_run.SWITCH_ENV, raising=False)
    yield mlflow_server
    while mlflow.active_run():
        mlflow.end_run("KILLED")


@pytest.fixture
def name():
    """A model name of this test's own, since the server lives for the whole session."""
    import uuid

    from flows import registry

    return f"{registry.MODEL_NAME}-{uuid.uuid4().hex[:6]}"
