"""MlflowTracker and the pipeline/stage runs against a real `mlflow server` on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows import mlflow_run, tracking
from flows.mlflow_run import check_reachable, pipeline_run, sanitize_key
from flows.tracking import MlflowTracker, stage_run
from tests import servers
from tests.mlflow_server import SERVER_ENV
from vim_core.errors import TransientError, VimError
from vim_core.train.tracking import Tracker


@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch):
    """Point tracking at the session server, in an experiment of this test's own."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(mlflow_run.PARENT_ENV, raising=False)
    monkeypatch.delenv(mlflow_run.SWITCH_ENV, raising=False)
    yield mlflow_server
    while mlflow.active_run():
        mlflow.end_run("KILLED")


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url)


def test_sanitize_key():
    assert sanitize_key("loss/total") == "loss/total"
    assert sanitize_key("eval/psnr(db)") == "eval/psnr_db_"
    assert sanitize_key("/a//b/") == "a/b"  # MLflow refuses names that normalise to another path
    assert sanitize_key("a/../b") == "a/_/b"
    assert sanitize_key("fid@inception,2048") == "fid_inception_2048"
    long_a, long_b = sanitize_key("x" * 300 + "a"), sanitize_key("x" * 300 + "b")
    assert len(long_a) == mlflow_run.MAX_KEY and long_a != long_b


def test_embedded_default_is_local_sqlite(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_run.tracking_uri() == f"sqlite:///{mlflow_run.REPO / 'mlflow.db'}"
    assert mlflow_run.artifact_location() == (mlflow_run.REPO / "mlartifacts").as_uri()
    check_reachable()  # a local store needs no server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert mlflow_run.artifact_location() is None  # the server decides


def test_registry_follows_a_new_tracking_uri_unless_the_user_set_one(monkeypatch, tmp_path):
    """MLflow's set_registry_uri writes MLFLOW_REGISTRY_URI into os.environ; configure() must not mistake
    that for the user's setting, or a second server would get the runs while the first got the models."""
    import mlflow

    monkeypatch.delenv(mlflow_run.REGISTRY_ENV, raising=False)
    first, second = (f"sqlite:///{tmp_path / name}.db" for name in ("first", "second"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first)
    mlflow_run.configure()
    assert mlflow.get_registry_uri() == first and mlflow_run.REGISTRY_ENV not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", second)
    mlflow_run.configure()
    assert mlflow.get_registry_uri() == second
    assert mlflow_run.client()._registry_uri == second
    own = f"sqlite:///{tmp_path / 'registry'}.db"
    monkeypatch.setenv(mlflow_run.REGISTRY_ENV, own)  # the user's own registry wins
    mlflow_run.configure()
    assert mlflow.get_registry_uri() == own and os.environ[mlflow_run.REGISTRY_ENV] == own


def test_embedded_store_keeps_runs_and_artifacts_in_the_repo(monkeypatch, tmp_path):
    """No server configured: sqlite mlflow.db and mlartifacts/ in the repo root (here a stand-in)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(mlflow_run.PARENT_ENV, raising=False)
    monkeypatch.delenv(mlflow_run.SWITCH_ENV, raising=False)
    monkeypatch.setattr(mlflow_run, "REPO", tmp_path)
    (tmp_path / "note.txt").write_text("hi")
    with stage_run("prepare_data", {"size": 32}) as t:
        t.log_artifact(tmp_path / "note.txt")
    assert (tmp_path / "mlflow.db").is_file()
    assert [p.read_text() for p in (tmp_path / "mlartifacts").rglob("note.txt")] == ["hi"]
    assert mlflow_run.client().get_run(t.run_id).data.params == {"size": "32"}


def test_tracker_logs_params_metrics_images_artifacts_to_nested_run(mlflow_env, tmp_path):
    params = {"tokenizer": {"dim": 64, "layers": [2, 2], "loss": {"l2": 1.0}}, "seed": 0, "note": "x" * 7000}
    params.update({f"extra_{i}": i for i in range(150)})  # more than one log_batch (100 params) holds
    grid = (np.arange(3 * 8 * 12) % 251).astype(np.uint8).reshape(3, 8, 12)  # CHW, as trainers make them
    png = tmp_path / "samples.png"
    Image.fromarray(np.full((4, 4), 200, np.uint8)).save(png)
    report = tmp_path / "summary.json"
    report.write_text('{"ok": true}')

    with pipeline_run("pipeline-test", tags={"trigger": "pytest"}) as parent_id:
        assert os.environ[mlflow_run.PARENT_ENV] == parent_id
        with stage_run("train_tokenizer", params) as tracker:
            assert isinstance(tracker, Tracker)
            tracker.log_metrics(
                {"loss/total": torch.tensor(1.5), "train/usage": 0.25, "eval/psnr(db)": 19}, 0
            )
            tracker.log_metrics({"loss/total": 1.0, "train/usage": np.float32(0.5), "note": "n/a"}, step=10)
            tracker.log_image(grid, "recon")
            tracker.log_image(png, "samples_step10")
            tracker.log_artifact(report, "reports/final.json")
            tracker.log_artifact(report)
            stage_id = tracker.run_id
    assert mlflow_run.PARENT_ENV not in os.environ

    c = _client(mlflow_env.url)
    run, parent = c.get_run(stage_id), c.get_run(parent_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.info.experiment_id == parent.info.experiment_id
    assert (run.info.status, parent.info.status) == ("FINISHED", "FINISHED")
    assert parent.data.tags["trigger"] == "pytest"
    assert run.data.tags["vim.stage"] == "train_tokenizer"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=mlflow_run.REPO, capture_output=True, text=True)
    assert run.data.tags["vim.git.commit"] == head.stdout.strip()
    assert run.data.tags["vim.git.dirty"] in ("true", "false")
    if (mlflow_run.REPO / "dvc.lock").exists():
        assert len(run.data.tags["vim.dvc.lock_sha256"]) == 64

    p = run.data.params
    assert (
        p["tokenizer.dim"] == "64" and p["tokenizer.loss.l2"] == "1.0" and p["tokenizer.layers"] == "[2, 2]"
    )
    assert p["note"] == "x" * tracking.MAX_PARAM_VALUE
    assert p["extra_149"] == "149" and len(p) == 155

    history = [(m.step, m.value) for m in c.get_metric_history(stage_id, "loss/total")]
    assert sorted(history) == [(0, 1.5), (10, 1.0)]
    assert sorted((m.step, m.value) for m in c.get_metric_history(stage_id, "train/usage")) == [
        (0, 0.25),
        (10, 0.5),
    ]
    assert run.data.metrics["eval/psnr_db_"] == 19.0
    assert "note" not in run.data.metrics  # not a number

    out = tmp_path / "down"
    got = np.asarray(Image.open(c.download_artifacts(stage_id, "images/recon.png", str(out))))
    np.testing.assert_array_equal(got, grid.transpose(1, 2, 0))
    got = np.asarray(Image.open(c.download_artifacts(stage_id, "images/samples_step10.png", str(out))))
    assert got.shape == (4, 4) and (got == 200).all()
    final = Path(c.download_artifacts(stage_id, "reports/final.json", str(out)))
    assert json.loads(final.read_text()) == {"ok": True}
    assert [f.path for f in c.list_artifacts(stage_id)] == ["images", "reports", "summary.json"]


def test_stage_in_another_process_nests_under_the_pipeline_run(mlflow_env):
    code = (
        "from flows.tracking import stage_run\n"
        "with stage_run('evaluate', {'samples': 64}) as t:\n"
        "    t.log_metrics({'eval/fid_domain': 12.5}, step=0)\n"
        "    print('RUN', t.run_id)\n"
    )
    with pipeline_run("pipeline-xproc") as parent_id:
        # The child inherits VIM_PARENT_RUN_ID and MLFLOW_TRACKING_URI, as a DVC stage does.
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=mlflow_run.REPO, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        with pytest.raises(RuntimeError), stage_run("train_transformer") as t:
            failed_id = t.run_id
            raise RuntimeError("diverged")
    child_id = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("RUN "))
    c = _client(mlflow_env.url)
    child = c.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.params == {"samples": "64"} and child.data.metrics == {"eval/fid_domain": 12.5}
    failed = c.get_run(failed_id)
    assert failed.data.tags["mlflow.parentRunId"] == parent_id and failed.info.status == "FAILED"
    children = c.search_runs(
        [child.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert {r.info.run_id for r in children} == {child_id, failed_id}


def test_stage_without_pipeline_is_top_level_and_stale_parent_fails(mlflow_env, monkeypatch):
    with stage_run("prepare_data") as t:
        run_id = t.run_id
    assert "mlflow.parentRunId" not in _client(mlflow_env.url).get_run(run_id).data.tags
    monkeypatch.setenv(mlflow_run.PARENT_ENV, uuid.uuid4().hex)
    with pytest.raises(VimError, match=mlflow_run.PARENT_ENV), stage_run("prepare_data"):
        pass


def test_tracker_needs_a_run(mlflow_env):
    with pytest.raises(VimError, match="needs a run"):
        MlflowTracker()


def test_check_reachable_on_closed_port_is_transient_and_fast(mlflow_env, monkeypatch):
    check_reachable()  # the live server answers
    uri = f"http://127.0.0.1:{servers.free_port()}"
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        check_reachable(uri)
    assert time.monotonic() - started < 5
    assert uri in str(err.value) and "\n" not in str(err.value)
    # credentials in the URI stay out of the message; stage_run waits VIM_TRACKING_WAIT seconds for the
    # server, not MLflow's minutes of retries
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace("http://", "http://bob:s3cret@"))
    monkeypatch.setenv(mlflow_run.WAIT_ENV, "2")
    started = time.monotonic()
    with pytest.raises(TransientError) as err, stage_run("prepare_data"):
        pass
    assert 2 <= time.monotonic() - started < 8
    shown = uri.replace("http://", "http://REDACTED@")  # vim_core.redact.redact_url
    assert "s3cret" not in str(err.value) and shown in str(err.value) and "within 2 s" in str(err.value)


def test_tracking_off_touches_no_server(monkeypatch):
    monkeypatch.setenv(mlflow_run.SWITCH_ENV, "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{servers.free_port()}")
    with stage_run("prepare_data", {"a": 1}) as t:
        t.log_metrics({"loss/total": 1.0}, step=0)
        assert t.run_id is None


def test_server_serves_the_ui_page(mlflow_server):
    with urllib.request.urlopen(mlflow_server.url + "/", timeout=10) as r:
        assert r.status == 200 and b"<html" in r.read().lower()


def test_mlflow_ui_serves_its_page(tmp_path):
    port = servers.free_port()
    cmd = [
        str(servers.BIN / "mlflow"),
        "ui",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'ui.db'}",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--workers",
        "1",
    ]
    url = f"http://127.0.0.1:{port}/"
    proc = servers.start(cmd, url, tmp_path / "ui.log", env=SERVER_ENV, timeout=120)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
            assert b"<html" in r.read().lower()
    finally:
        servers.stop(proc)
