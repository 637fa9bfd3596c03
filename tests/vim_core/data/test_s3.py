"""The data stage against a real S3 endpoint (moto's server on 127.0.0.1, IAM auth enforced)."""

import uuid

import numpy as np
import pytest

from tests.vim_core.data.test_data import _cfg, make_folder, make_tars
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
    assert sum(report.counts.values()) == 15
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape[1:] == (1, 32, 32) and x.max() > 200 and set(np.unique(y)) <= {0, 1, 2}


def test_tar_shards_on_s3(tmp_path, mnist, s3_env):
    bucket = _bucket()
    _upload(s3_env, make_tars(tmp_path / "tars", mnist, "webdataset", n=20), bucket, "shards")
    report = prepare(_cfg(tmp_path, source={"kind": "tar_shards", "url": f"s3://{bucket}/shards"}))
    assert sum(report.counts.values()) == 40


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


def test_an_unreachable_endpoint_is_transient_and_named(tmp_path, s3_env, monkeypatch):
    import time

    import s3fs

    from tests.servers import free_port
    from vim_core.errors import TransientError

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    started = time.monotonic()
    with pytest.raises(TransientError, match=f"storage endpoint {endpoint} unreachable"):
        prepare(_cfg(tmp_path, source={"kind": "tar_shards", "url": "s3://any-bucket/shards"}))
    assert time.monotonic() - started < 30  # 3 tries with short backoff, not botocore's legacy 5
    assert not (tmp_path / "out").exists()


def test_a_connection_cut_mid_read_is_transient_and_names_the_object():
    from vim_core.data.storage import io_error, s3_config
    from vim_core.errors import TransientError

    for err in (ConnectionResetError(104, "Connection reset by peer"), TimeoutError("read timed out")):
        out = io_error("s3://b/shards", err, None, "s3://b/shards/s003.tar")
        assert isinstance(out, TransientError) and "reading s3://b/shards/s003.tar" in str(out)
    assert not isinstance(io_error("s3://b/x", FileNotFoundError("x")), TransientError)
    assert s3_config()["retries"] == {"mode": "standard", "max_attempts": 3}


def test_push_retry_delays_and_what_is_not_retried(monkeypatch):
    from flows.retrain import _NOT_TRANSIENT, PUSH_RETRY_DELAYS_ENV, push_retry_delays

    monkeypatch.delenv(PUSH_RETRY_DELAYS_ENV, raising=False)
    assert push_retry_delays() == [5, 15, 45]
    monkeypatch.setenv(PUSH_RETRY_DELAYS_ENV, "1, 2.5")
    assert push_retry_delays() == [1, 2.5]
    for bad in ("soon", "-1", "1,,2"):
        monkeypatch.setenv(PUSH_RETRY_DELAYS_ENV, bad)
        with pytest.raises(VimError, match=PUSH_RETRY_DELAYS_ENV):
            push_retry_delays()
    assert _NOT_TRANSIENT.search("An error occurred (403) when calling PutObject")
    assert not _NOT_TRANSIENT.search(
        'Could not connect to the endpoint URL: "http://127.0.0.1:40373/b/md5/40/3f"'
    )
