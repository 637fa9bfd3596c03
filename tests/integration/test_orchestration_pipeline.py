"""Retraining end to end on 127.0.0.1: a tiny pipeline through DVC, tracked on a real `mlflow server`,
registered and promoted, served by `mlflow models serve`, scheduled on a real `prefect server start`, its
outputs pushed to and pulled from moto's S3.

One tiny repository (a git copy of the working tree with a micro params.yaml) is trained once for the
module; the tests then run in file order on its growing history: the first retrain promotes bundle 1, a
worse variant leaves it champion, the deployments and the push add more challengers.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests import servers
from tests.conftest import GIT_IDENTITY, copy_repo, git_commit

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NAMES = ("vim",)
STAGES = (
    "prepare_data",
    "train_classifier",
    "train_tokenizer",
    "evaluate_tokenizer",
    "tokenize_dataset",
    "pretrain_transformer",
    "evaluate",
)
MICRO_VIT = {"blocks": 1, "heads": 2, "dim": 32, "mlp_dim": 64}
MICRO_VIM = {"layers": 2, "heads": 2, "dim": 32, "mlp_dim": 64, "num_classes": 10, "dropout": 0.0}


def tiny_params(raw: dict) -> dict:
    """params.yaml shrunk to CPU seconds, output paths unchanged (dvc.yaml names them).

    The domain FID of a model this small says little (its classifier trains for one epoch), so the
    promotion rule here ranks by reconstruction PSNR: a tokenizer trained for 3 steps loses to one
    trained for 60, every time. The production rule (fid_domain with a class-accuracy guard) runs
    through the same code.
    """
    raw["data"]["max_images"] = 1200
    tok = raw["tokenizer"]
    tok["model"].update({"encoder": MICRO_VIT, "decoder": MICRO_VIT, "codebook_size": 64, "code_dim": 8})
    tok["loss"]["adversarial_weight"] = 0.0
    tok["train"].update(
        steps=60,
        batch_size=16,
        checkpoint_every=20,
        threads=1,
        log_every=5,
        schedule={"kind": "cosine", "peak_lr": 1e-3, "final_lr": 1e-4, "warmup_steps": 2},
    )
    tok["eval"] = {"max_test_images": 100, "usage_batch_size": 32, "grid_images": 8}
    vim = raw["transformer"]
    vim["model"] = MICRO_VIM
    vim["train"].update(
        steps=40,
        batch_size=16,
        checkpoint_every=20,
        threads=1,
        log_every=5,
        schedule={
            "kind": "exponential",
            "peak_lr": 3e-3,
            "final_lr": 3e-4,
            "warmup_steps": 2,
            "decay_start": 4,
        },
    )
    vim["uncond"] = {
        "steps": 10,
        "schedule": {
            "kind": "exponential",
            "peak_lr": 3e-3,
            "final_lr": 3e-4,
            "warmup_steps": 2,
            "decay_start": 2,
        },
    }
    vim["probe"] = {"epochs": 20}
    raw["evaluate"].update(
        num_samples=20,
        kid_subset_size=10,
        max_probe_train=300,
        classifier={"epochs": 1},
        sampling_search={"cfg_scales": [1.0, 3.0], "samples": 20, "reference_images": 30},
    )
    raw["promotion"] = {
        "metric": "psnr",
        "lower_is_better": False,
        "guard_metric": "codebook_usage",
        "guard_min": 0.0,
    }
    return raw


def tiny_repo(repo: Path) -> Path:
    """A git copy of the working tree at `repo` whose committed params.yaml is tiny_params'."""
    repo.mkdir()
    copy_repo(repo)
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(yaml.safe_load(params.read_text())), sort_keys=False))
    git_commit(repo, "tiny params")
    return repo


# ---- fixtures


@pytest.fixture(scope="module")
def orch(tmp_path_factory, mlflow_server, prefect_server):
    """The tiny repository and the environment its commands run in (both servers, own experiment)."""
    root = tmp_path_factory.mktemp("orch")
    repo = tiny_repo(root / "repo")
    (root / "prefect-client").mkdir()
    env = {
        **os.environ,
        **servers.prefect_env(root / "prefect-client", api_url=f"{prefect_server}/api"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_NAME": "orchestration",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "OMP_NUM_THREADS": "1",  # micro models on shared cores: one thread each, no spinning
    }
    for key in ("VIM_PARENT_RUN_ID", "VIM_TRACKING", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    return type(
        "Orch", (), {"repo": repo, "env": env, "mlflow": mlflow_server.url, "prefect": prefect_server}
    )


def retrain(orch, *args: str, env: dict | None = None, timeout: float = 900) -> dict:
    """`python -m flows.retrain ARGS` in the tiny repo; its one-line JSON summary."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "flows.retrain", *args],
        cwd=orch.repo,
        env={**orch.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    summary["seconds"] = time.monotonic() - started
    return summary


@pytest.fixture(scope="module")
def first(orch) -> dict:
    return retrain(orch)


def _client(orch):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=orch.mlflow, registry_uri=orch.mlflow)


def _aliases(c, alias: str) -> dict[str, str]:
    return {n: c.get_model_version_by_alias(n, alias).version for n in NAMES}


def _pipeline_runs(c) -> list:
    exp = c.get_experiment_by_name("orchestration")
    return c.search_runs(
        [exp.experiment_id],
        filter_string="tags.`vim.kind` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )


def _children(c, parent) -> dict:
    runs = c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return {r.info.run_name: r for r in runs}


@pytest.fixture
def mlflow_uri(orch, monkeypatch):
    """This process loads the models: point it at the server; one torch thread for micro models."""
    import mlflow
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", orch.mlflow)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(orch.mlflow)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", orch.mlflow)  # mlflow.set_registry_uri would outlive the test
    mlflow.set_registry_uri(orch.mlflow)
    yield orch.mlflow
    torch.set_num_threads(threads)


# ---- (a) one pipeline run, tracked, registered, promoted, loadable


def test_retrain_tracks_every_stage_and_promotes_the_first_bundle(orch, first, tmp_path):
    assert first["versions"] == dict.fromkeys(NAMES, "1")
    assert first["promotion"] == "promoted"
    c = _client(orch)
    [pipeline] = _pipeline_runs(c)
    assert pipeline.info.status == "FINISHED" and pipeline.data.tags["vim.trigger"] == "manual"
    assert pipeline.data.tags["vim.repo"] == str(orch.repo)
    runs = _children(c, pipeline)
    assert set(runs) == {*STAGES, "publish"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=orch.repo, capture_output=True, text=True)
    for r in runs.values():
        assert r.data.tags["vim.git.commit"] == head.stdout.strip()
        assert len(r.data.tags["vim.dvc.lock_sha256"]) == 64

    # params: the sections each stage declares in dvc.yaml
    tok = runs["train_tokenizer"]
    assert tok.data.params["tokenizer.train.steps"] == "60" and tok.data.params["seed"] == "0"
    assert "transformer.train.steps" not in tok.data.params
    assert runs["pretrain_transformer"].data.params["transformer.train.steps"] == "40"
    assert runs["evaluate"].data.params["evaluate.num_samples"] == "20"
    # per-step metrics from the trainers' tracker callback, every log_every=5 steps
    steps = [m.step for m in c.get_metric_history(tok.info.run_id, "loss/total")]
    assert sorted(steps) == [*range(0, 60, 5), 59]
    vim_steps = [m.step for m in c.get_metric_history(runs["pretrain_transformer"].info.run_id, "loss/train")]
    assert sorted(vim_steps) == [*range(0, 40, 5), 39]
    # transformer.uncond: the unconditional copy, in the same run under uncond/, draws the unconditional samples
    copy_steps = [
        m.step for m in c.get_metric_history(runs["pretrain_transformer"].info.run_id, "uncond/loss/train")
    ]
    assert sorted(copy_steps) == [0, 5, 9]
    assert runs["pretrain_transformer"].data.params["uncond.transformer.model.num_classes"] == "0"
    assert (orch.repo / "models" / "transformer" / "uncond" / "transformer.safetensors").is_file()
    # the final metrics JSON, as metrics and as the file; the plots as images
    eval_json = json.loads((orch.repo / "metrics" / "eval.json").read_text())
    ev = runs["evaluate"]
    assert ev.data.metrics["psnr"] == pytest.approx(eval_json["psnr"])
    assert ev.data.metrics["fid_domain"] == pytest.approx(eval_json["fid_domain"])
    assert not any(k.startswith("definitions") for k in ev.data.metrics)
    assert eval_json["definitions"]["generation_uncond"]["how"].startswith("the unconditional copy")
    assert ev.data.tags["vim.eval_config_hash"] == eval_json["eval_config_hash"]
    images = {a.path for a in c.list_artifacts(ev.info.run_id, "images")}
    assert {"images/samples_per_class.png", "images/reconstructions.png"} <= images
    got = json.loads(
        Path(c.download_artifacts(ev.info.run_id, "metrics/eval.json", str(tmp_path))).read_text()
    )
    assert got == eval_json
    assert "images/tokenizer_reconstructions.png" in {
        a.path for a in c.list_artifacts(tok.info.run_id, "images")
    }
    assert runs["prepare_data"].data.metrics["counts/train"] > 0

    # registry: one version of `vim`, champion and challenger, tagged with the eval metrics and hash
    assert _aliases(c, "champion") == _aliases(c, "challenger") == dict.fromkeys(NAMES, "1")
    for name in NAMES:
        mv = c.get_model_version(name, "1")
        assert mv.tags["vim.pipeline_run"] == pipeline.info.run_id
        assert mv.tags["vim.eval_config_hash"] == eval_json["eval_config_hash"]
        assert float(mv.tags["metric.psnr"]) == pytest.approx(eval_json["psnr"])
    decision = json.loads(
        Path(
            c.download_artifacts(runs["publish"].info.run_id, "promotion/decision.json", str(tmp_path))
        ).read_text()
    )
    assert decision["outcome"] == "promoted" and decision["metric"] == "psnr"


def test_retrain_ran_the_pipeline_flow_with_a_task_per_stage(orch, first):
    """The stages ran as the `pipeline` subflow of retrain, one Prefect task each (flows/pipeline.py)."""
    from tests.flows.test_pipeline import task_runs

    runs, logs = task_runs(orch.prefect)
    assert runs["flow"].parent_task_run_id is not None and runs["flow"].state.is_completed()
    assert sorted(runs["tasks"]) == sorted(STAGES)
    assert "Running stage 'evaluate':" in logs


def test_champion_generator_tokenizer_and_transformer_load_and_run(orch, first, mlflow_uri):
    import mlflow
    import pandas as pd

    from flows.pyfunc_models import decode_png
    from vim_core.data.shards import load_split
    from vim_core.tokenizer.export import load_tokenizer
    from vim_core.tokenizer.model import to_model_range

    gen = mlflow.pyfunc.load_model("models:/vim@champion")
    sig = gen.metadata.signature
    defaults = {p.name: p.default for p in sig.params.params}
    # the sampling evaluate used: the guidance scale its search picked on val images, from eval.json
    search = json.loads((orch.repo / "metrics" / "eval.json").read_text())["definitions"]["sampling_search"]
    picked = search["conditional"]
    assert picked["cfg_scale"] in (1.0, 3.0) and defaults["cfg_scale"] == picked["cfg_scale"]
    assert defaults["top_k"] == 0 and defaults["seed"] == 0
    assert [c.name for c in sig.outputs.inputs] == ["class_id", "image_png"]
    out = gen.predict(pd.DataFrame({"class_id": [0, 1, 2, 7]}), params={"seed": 7, "temperature": 0.9})
    assert list(out.class_id) == [0, 1, 2, 7]
    images = [decode_png(s) for s in out.image_png]
    assert all(im.shape == (32, 32) and im.dtype == np.uint8 for im in images)
    again = gen.predict([0, 1, 2, 7], params={"seed": 7, "temperature": 0.9})
    assert list(again.image_png) == list(out.image_png)  # a list works too; same seed, same images
    other = gen.predict([0, 1, 2, 7], params={"seed": 8, "top_k": 5, "top_p": 0.9, "cfg_scale": 1.5})
    assert list(other.image_png) != list(out.image_png)

    # the tokenizer and the transformer, from the champion's artifacts (docs/operations.md)
    import torch

    from vim_core.transformer.export import load_transformer
    from vim_core.transformer.sampling import sample

    root = mlflow.artifacts.download_artifacts("models:/vim@champion")
    tok = load_tokenizer(root + "/artifacts/tokenizer.safetensors").eval()
    test_x, _ = load_split(orch.repo / "data" / "prepared", "test", limit=8)
    local = load_tokenizer(str(orch.repo / "models" / "tokenizer" / "tokenizer.safetensors")).eval()
    with torch.inference_mode():
        tokens, expected = (t.encode(to_model_range(test_x)).numpy() for t in (tok, local))
    np.testing.assert_array_equal(tokens, expected)
    vim, _ = load_transformer(root + "/artifacts/transformer.safetensors")
    grid = sample(vim, 2, torch.tensor([3, 4]), device=torch.device("cpu"), seed=1)
    assert grid.shape == (2, 64) and grid.min() >= 0 and grid.max() < 64


# ---- (b) mlflow models serve


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_models_serve_answers_invocations_with_images(orch, first, mlflow_uri, tmp_path):
    import mlflow

    from flows.pyfunc_models import decode_png

    port = servers.free_port()
    cmd = [
        str(BIN / "mlflow"), "models", "serve", "-m", "models:/vim@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc = servers.start(cmd, f"{url}/ping", tmp_path / "serve.log", env=orch.env, timeout=180)
    try:
        body = {
            "dataframe_records": [{"class_id": 3}, {"class_id": 5}],
            "params": {"seed": 11, "temperature": 0.8, "top_k": 20, "top_p": 0.95, "cfg_scale": 2.0},
        }
        status, answer = _post(f"{url}/invocations", body)
        assert status == 200, answer
        rows = answer["predictions"]
        assert [r["class_id"] for r in rows] == [3, 5]
        assert all(decode_png(r["image_png"]).shape == (32, 32) for r in rows)
        local = mlflow.pyfunc.load_model("models:/vim@champion").predict([3, 5], params=body["params"])
        assert [r["image_png"] for r in rows] == list(local.image_png)  # same seed, same pixels, any process
        status, answer = _post(f"{url}/invocations", {"inputs": [1, -1, 4]})  # -1: the unconditional copy
        assert status == 200 and [r["class_id"] for r in answer["predictions"]] == [1, -1, 4]
        status, answer = _post(f"{url}/invocations", {"dataframe_records": [{"class_id": 42}]})
        assert status == 400 and "-1..9 (-1: an unconditional image), got [42]" in answer["message"]
    finally:
        servers.stop(proc)


# ---- (c) a worse variant does not take champion


def test_worse_variant_stays_challenger(orch, first, tmp_path):
    before = json.loads((orch.repo / "metrics" / "eval.json").read_text())
    worse = retrain(orch, "--set", "tokenizer.train.steps=3")
    after = json.loads((orch.repo / "metrics" / "eval.json").read_text())
    assert after["psnr"] < before["psnr"] and after["eval_config_hash"] == before["eval_config_hash"]
    assert worse["versions"] == dict.fromkeys(NAMES, "2") and worse["promotion"] == "kept"
    c = _client(orch)
    assert _aliases(c, "champion") == dict.fromkeys(NAMES, "1")
    assert _aliases(c, "challenger") == dict.fromkeys(NAMES, "2")
    assert c.get_model_version("vim", "2").tags["vim.promotion"].startswith("kept: psnr")
    pipeline = _pipeline_runs(c)[-1]
    runs = _children(c, pipeline)
    # dvc exp run: the stages that changed ran again, as an experiment; prepare_data and
    # train_classifier were cached
    assert set(runs) == {*STAGES[2:], "publish"}
    assert runs["train_tokenizer"].data.tags["vim.dvc.exp_name"]
    assert runs["train_tokenizer"].data.params["tokenizer.train.steps"] == "3"
    table = json.loads(
        Path(
            c.download_artifacts(runs["publish"].info.run_id, "promotion/comparison.json", str(tmp_path))
        ).read_text()
    )
    records = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    gen = {r["role"]: r for r in records}
    assert gen["champion"]["version"] == "1" and gen["challenger"]["version"] == "2"
    assert gen["challenger"]["psnr"] == pytest.approx(after["psnr"], abs=1e-3)
    # flows.compare's table and sample grids, on the challenger's run, linked from its version
    publish_run = runs["publish"].info.run_id
    assert {f.path for f in c.list_artifacts(publish_run, "comparison")} == {
        "comparison/comparison.md",
        "comparison/comparison.png",
    }
    mv = c.get_model_version("vim", "2")
    assert mv.tags["vim.comparison"] == f"runs:/{publish_run}/comparison/comparison.md"
    assert "| psnr |" in mv.description


# ---- (d) the scheduled deployment on a real Prefect server


def _prefect(orch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: f"{orch.prefect}/api"})


def _wait_for_deployment(orch, name: str, proc=None, timeout: float = 180):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with _prefect(orch), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"flows.deploy exited with {proc.returncode}")
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise TimeoutError(f"deployment {name} did not appear within {timeout}s")


def test_served_deployment_has_its_schedule_and_a_triggered_run_registers_a_challenger(orch, first, tmp_path):
    from prefect.deployments import run_deployment

    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115  (closed below; the child keeps a copy)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy", "--cron", "17 4 * * 2", "--timezone", "Europe/Paris"],
        cwd=orch.repo, env=orch.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()
    try:
        dep = _wait_for_deployment(orch, "retrain/scheduled", proc)
        [sched] = dep.schedules
        assert (
            sched.schedule.cron == "17 4 * * 2" and sched.schedule.timezone == "Europe/Paris" and sched.active
        )
        before = _client(orch).get_model_version_by_alias("vim", "challenger").version
        with _prefect(orch):
            run = run_deployment("retrain/scheduled", timeout=900)
        assert run.state.is_completed(), (tmp_path / "serve.log").read_text()[-4000:]
    finally:
        servers.stop(proc, timeout=30)
    c = _client(orch)
    after = c.get_model_version_by_alias("vim", "challenger").version
    assert int(after) == int(before) + 1
    pipeline = _pipeline_runs(c)[-1]
    assert pipeline.data.tags["vim.trigger"] == "scheduled" and pipeline.data.tags["vim.repo"] == str(
        orch.repo
    )
    assert pipeline.data.tags["prefect.flow_run_id"] == str(run.id)


def test_work_pool_deployment_runs_on_a_process_worker(orch, first, tmp_path):
    from prefect.deployments import run_deployment

    out = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "--pool", "vim-process", "--name", "pooled", "--cron", "0 5 * * *"],
        cwd=orch.repo, env=orch.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    dep = _wait_for_deployment(orch, "retrain/pooled")
    assert dep.work_pool_name == "vim-process" and dep.schedules[0].schedule.cron == "0 5 * * *"
    # the worker runs it in the checkout that deployed it (and imports that checkout's flows)
    assert dep.job_variables["working_dir"] == str(orch.repo)
    before = _client(orch).get_model_version_by_alias("vim", "challenger").version
    with _prefect(orch):
        run = run_deployment("retrain/pooled", timeout=0)  # scheduled now; the worker picks it up
    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", "vim-process", "--type", "process", "--run-once"],
        cwd=tmp_path, env=orch.env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    from prefect.client.orchestration import get_client

    with _prefect(orch), get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), (worker.stdout + worker.stderr)[-4000:]
    c = _client(orch)
    after = c.get_model_version_by_alias("vim", "challenger").version
    assert int(after) == int(before) + 1
    pipeline = _pipeline_runs(c)[-1]
    assert pipeline.data.tags["vim.trigger"] == "pooled" and pipeline.data.tags["vim.repo"] == str(orch.repo)


# ---- (e) DVC remote on S3 (moto)


def test_retrain_pushes_outputs_that_a_fresh_clone_pulls(orch, first, s3, tmp_path):
    bucket = "vim-dvc"
    s3.client().create_bucket(Bucket=bucket)
    env = {**orch.env, **s3.env()}

    def dvc(*args, cwd):
        out = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    dvc("remote", "add", "-d", "store", f"s3://{bucket}/cache", cwd=orch.repo)
    dvc("remote", "modify", "--local", "store", "endpointurl", s3.url, cwd=orch.repo)
    summary = retrain(orch, "--push", env=s3.env())
    assert summary["promotion"] in ("kept", "promoted")
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys and all(k.startswith("cache/files/md5/") for k in keys)
    git_commit(orch.repo, "pipeline outputs")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(orch.repo), str(clone)], check=True)
    dvc("remote", "modify", "--local", "store", "endpointurl", s3.url, cwd=clone)
    dvc("pull", cwd=clone)
    for rel in ("models/tokenizer/tokenizer.safetensors", "models/transformer/transformer.safetensors"):
        assert (clone / rel).read_bytes() == (orch.repo / rel).read_bytes()
    assert "up to date" in dvc("status", cwd=clone).lower()


# ---- (f) the UIs


def test_prefect_and_mlflow_uis_answer(orch):
    for url in (f"{orch.prefect}/", f"{orch.prefect}/api/health", f"{orch.mlflow}/"):
        req = urllib.request.Request(url, headers={"Accept": "text/html"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, url
            body = r.read()
            assert body == b"true" if url.endswith("/health") else b"<html" in body.lower()


def test_second_repro_is_a_noop_and_a_transformer_param_reruns_only_its_stages(orch, first):
    """Last in the module: it edits params.yaml. `dvc metrics diff` must then show the change."""

    def dvc(*args: str) -> str:
        out = subprocess.run(
            ["dvc", *args],
            cwd=orch.repo,
            env={**orch.env, "VIM_TRACKING": "off"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        return out.stdout

    # dvc metrics diff compares with HEAD: commit the current outputs (there may be nothing new).
    subprocess.run(["git", "add", "-A"], cwd=orch.repo, check=True)
    git_env = {**os.environ, **GIT_IDENTITY}
    subprocess.run(
        ["git", "commit", "-qm", "outputs", "--allow-empty"], cwd=orch.repo, check=True, env=git_env
    )
    started = time.monotonic()
    noop = dvc("repro")
    elapsed = time.monotonic() - started
    assert "Running stage" not in noop, noop
    assert elapsed < 5.0, f"no-op dvc repro took {elapsed:.1f}s"

    params = orch.repo / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    steps = raw["transformer"]["train"]["steps"]
    raw["transformer"]["train"]["steps"] = steps + 10
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = dvc("repro")
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["pretrain_transformer", "evaluate"], out

    diff = json.loads(dvc("metrics", "diff", "--json"))
    change = diff["metrics/transformer.json"]["steps"]
    assert (change["old"], change["new"]) == (steps, steps + 10)
