"""A DVC remote on S3 (moto's server on 127.0.0.1): push, pull into a fresh clone, refused credentials."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import git_commit

BIN = Path(sys.executable).parent


def _dvc(*args, cwd, env):
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_push_then_pull_into_a_fresh_clone(s3, tmp_path):
    bucket = "dvc-remote-test"
    s3.client().create_bucket(Bucket=bucket)
    # The endpoint comes from AWS_ENDPOINT_URL alone: nothing but the bucket path is in the config.
    env = {**os.environ, **s3.env(), "DVC_NO_ANALYTICS": "1"}
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    assert _dvc("init", "-q", cwd=repo, env=env).returncode == 0
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(repo / "data" / f"shard-{i}.npy", rng.integers(0, 255, (64, 32, 32), dtype=np.uint8))
    for args in (("add", "data"), ("remote", "add", "-d", "store", f"s3://{bucket}/cache")):
        out = _dvc(*args, cwd=repo, env=env)
        assert out.returncode == 0, out.stderr
    git_commit(repo, "data", init=False)
    assert f"url = s3://{bucket}/cache" in (repo / ".dvc" / "config").read_text()
    assert not (repo / ".dvc" / "config.local").exists()

    out = _dvc("push", cwd=repo, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 4  # three files and the directory listing

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    out = _dvc("pull", cwd=clone, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for i in range(3):
        name = f"shard-{i}.npy"
        assert (clone / "data" / name).read_bytes() == (repo / "data" / name).read_bytes()
    assert "in sync" in _dvc("status", "--cloud", cwd=clone, env=env).stdout
    assert "up to date" in _dvc("status", cwd=clone, env=env).stdout

    # wrong credentials: a clear failure, and nothing pulled
    shutil.rmtree(clone / "data")
    shutil.rmtree(clone / ".dvc" / "cache", ignore_errors=True)
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    out = _dvc("pull", cwd=clone, env=bad)
    assert out.returncode != 0
    assert not (clone / "data").exists() or not any((clone / "data").iterdir())
