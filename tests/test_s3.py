"""The data stage against a real S3 endpoint (moto's server on 127.0.0.1, IAM auth enforced)."""

import uuid

import numpy as np
import pytest

from tests.test_data import _cfg, make_folder, make_tars
from vim_core.data.prepare import prepare
from vim_core.data.shards import load_split
from vim_core.errors import VimError


def _upload(s3, local_root, bucket, prefix):
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for path in local_root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local_root).as_posix()}")


def _bucket() -> str:
    return f"vim-{uuid.uuid4().hex[:12]}"


def test_image_folder_on_s3(tmp_path, mnist, s3_env):
    bucket = _bucket()
    _upload(s3_env, make_folder(tmp_path / "imgs", mnist, per_class=5), bucket, "digits")
    report = prepare(
        _cfg(tmp_path, source={"kind": "image_folder", "url": f"s3://{bucket}/digits"}, test_fraction=0.3)
    )
    assert report.counts["train"] + report.counts["test"] == 15
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape[1:] == (1, 32, 32) and x.max() > 200 and set(np.unique(y)) <= {0, 1, 2}


def test_tar_shards_on_s3(tmp_path, mnist, s3_env):
    bucket = _bucket()
    _upload(s3_env, make_tars(tmp_path / "tars", mnist, "webdataset", n=20), bucket, "shards")
    report = prepare(_cfg(tmp_path, source={"kind": "tar_shards", "url": f"s3://{bucket}/shards"}))
    assert report.counts["train"] + report.counts["test"] == 40


def test_missing_bucket(tmp_path, s3_env):
    with pytest.raises(VimError, match="the S3 bucket does not exist"):
        prepare(_cfg(tmp_path, source={"kind": "image_folder", "url": "s3://no-such-bucket-here/x"}))
    assert not (tmp_path / "out").exists()


def test_missing_prefix_in_existing_bucket(tmp_path, s3_env):
    bucket = _bucket()
    s3_env.client().create_bucket(Bucket=bucket)
    with pytest.raises(VimError, match="not found"):
        prepare(_cfg(tmp_path, source={"kind": "tar_shards", "url": f"s3://{bucket}/nothing"}))


def test_wrong_credentials(tmp_path, mnist, s3_env, monkeypatch):
    bucket = _bucket()
    _upload(s3_env, make_folder(tmp_path / "imgs", mnist, per_class=2), bucket, "digits")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(VimError, match="S3 refused the credentials"):
        prepare(_cfg(tmp_path, source={"kind": "image_folder", "url": f"s3://{bucket}/digits"}))
    assert not (tmp_path / "out").exists()
