"""Credentials in a data URL never leave the process (vim_core.redact), while the URL is still used as
given to read the data: a real prepare_data stage reads tar shards over HTTP from a loopback server with a
URL holding a password and a signed query string, tracked to a real MLflow store; then every output is
searched for the planted secrets."""

import io
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests import servers
from vim_core.redact import MASK, redact, redact_text, redact_url

pytestmark = pytest.mark.security

# Made per session, so no file of the repository (this one included) holds them.
SECRETS = tuple(f"{kind}{uuid.uuid4().hex}" for kind in ("pw", "sig", "tok", "cred"))


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://user:pa55@host/shards", f"https://{MASK}@host/shards"),
        ("s3://bucket/x.tar?X-Amz-Signature=abc&part=2", f"s3://bucket/x.tar?X-Amz-Signature={MASK}&part=2"),
        ("https://h/x?sig=a&se=b&sv=c", f"https://h/x?sig={MASK}&se={MASK}&sv={MASK}"),
        (
            "https://h/x?token=t&X-Amz-Credential=AKIA%2Fx",
            f"https://h/x?token={MASK}&X-Amz-Credential={MASK}",
        ),
        ("https://host/plain?part=1", "https://host/plain?part=1"),
        ("/local/folder", "/local/folder"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_text_and_nested_values():
    line = "source https://u:pw@h/a.tar?token=zz: not found"
    assert redact_text(line) == f"source https://{MASK}@h/a.tar?token={MASK}: not found"
    value = {"source": {"url": "https://u:pw@h/a", "kind": "tar_shards"}, "list": ["s3://b/k?sig=1"]}
    assert redact(value) == {
        "source": {"url": f"https://{MASK}@h/a", "kind": "tar_shards"},
        "list": [f"s3://b/k?sig={MASK}"],
    }


def _shard(path: Path, n: int = 60) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(buf, format="PNG")
            for name, data in ((f"k{i:03d}.png", buf.getvalue()), (f"k{i:03d}.cls", str(i % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def http_shards(tmp_path):
    """tar shards behind a loopback HTTP server that ignores credentials (they only travel in the URL)."""
    root = tmp_path / "www"
    root.mkdir()
    _shard(root / "s0.tar")
    port = servers.free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    proc = servers.start(cmd, f"http://127.0.0.1:{port}/s0.tar", tmp_path / "http.log")
    yield f"127.0.0.1:{port}"
    servers.stop(proc)


def _files_holding(root: Path, secrets: tuple[str, ...], skip: set[Path]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and path not in skip:
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {s}" for s in secrets if s.encode() in data]
    return hits


def _stage(repo: Path, home: Path, url: str) -> subprocess.CompletedProcess:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["data"]["source"] = {"kind": "tar_shards", "url": url}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "redaction",
        "OMP_NUM_THREADS": "1",
    }
    for key in ("VIM_TRACKING", "VIM_PARENT_RUN_ID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.prepare_data", "--params", "params.yaml"]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow  # two stage runs: about 30 s
def test_a_stage_leaks_no_credential_of_its_data_url(repo_copy, http_shards, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    query = f"X-Amz-Signature={SECRETS[1]}&token={SECRETS[2]}&X-Amz-Credential={SECRETS[3]}"
    url = f"http://vimuser:{SECRETS[0]}@{http_shards}/s0.tar?{query}"
    ok = _stage(repo_copy, home, url)
    assert ok.returncode == 0, ok.stderr[-3000:]
    manifest = yaml.safe_load((repo_copy / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["num_classes"] == 3 and manifest["source"]["url"].startswith(f"http://{MASK}@127.0.0.1")
    # The same URL with a missing shard: the error line names it, without its credentials.
    bad = _stage(repo_copy, home, url.replace("s0.tar", "missing.tar"))
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing.tar" in errors[0] and MASK in errors[0], bad.stderr[-2000:]
    outputs = "\n".join([ok.stdout, ok.stderr, bad.stdout, bad.stderr])
    assert not [s for s in SECRETS if s in outputs], outputs[-3000:]
    # Every file the runs wrote: MLflow's store and artifacts, metrics/,
    # data/prepared; params.yaml holds the URL by design (it is the input).
    assert (home / "mlflow.db").is_file() and list((repo_copy / "metrics").glob("*.json"))
    leaks = _files_holding(home, SECRETS, set()) + _files_holding(
        repo_copy, SECRETS, {repo_copy / "params.yaml"} | set((repo_copy / ".git").rglob("*"))
    )
    assert not leaks, leaks
