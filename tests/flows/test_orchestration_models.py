"""The pieces of orchestration that need no server: the pyfunc models, stage tracking from dvc.yaml,
publish's refusals, the deployment's schedule. MLflow runs on a local sqlite store in tmp; the models are
micro, randomly initialised ones (what they generate does not matter here, how they are packaged does).
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from flows import mlflow_run, publish, tracking
from flows.common import stage_params, tracked_stage
from flows.pyfunc_models import decode_png
from tests.vim_core.transformer.test_transformer_stage import stage2_params
from vim_core.config import parse_params
from vim_core.errors import VimError
from vim_core.io import sha256_file
from vim_core.tokenizer.export import save_tokenizer
from vim_core.tokenizer.model import build_tokenizer, to_model_range
from vim_core.train.tracking import NullTracker
from vim_core.transformer.export import save_transformer
from vim_core.transformer.gpt import VIM

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models on a shared 2-core machine: one torch thread is ~100x faster than two spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local sqlite tracking store with its artifacts, both in tmp; the environment points at it."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "models")
        mp.delenv(mlflow_run.PARENT_ENV, raising=False)
        mp.delenv(mlflow_run.SWITCH_ENV, raising=False)
        mp.setattr(mlflow_run, "REPO", root)  # artifacts under root/mlartifacts
        yield root


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Params whose tokenizer, transformer and unconditional copy files hold random micro models."""
    tmp = tmp_path_factory.mktemp("micro")
    raw = stage2_params(tmp)
    raw["transformer"]["sampling"] = {"temperature": 0.9, "top_k": 32, "seed": 3, "batch_size": 8}
    raw["transformer"]["uncond"] = {"steps": 40}
    raw["evaluate"] = {"cfg_scale": 2.5}
    params = parse_params(raw)
    torch.manual_seed(0)
    tok = build_tokenizer(params.tokenizer.model, 32, 1)
    tok_path = Path(params.tokenizer.out_dir) / "tokenizer.safetensors"
    tok_path.parent.mkdir(parents=True)
    save_tokenizer(tok, params.tokenizer.model, str(tok_path))
    vim = VIM(params.transformer.resolved_model(), tok.codebook_size, (8, 8))
    vim_path = Path(params.transformer.out_dir) / "transformer.safetensors"
    vim_path.parent.mkdir(parents=True)
    save_transformer(vim, str(vim_path), extra={"tokenizer_sha256": sha256_file(tok_path)})
    copy_section = params.transformer.uncond_section()
    copy = VIM(copy_section.resolved_model(), tok.codebook_size, (8, 8))
    copy.start_from_conditional(vim)
    with torch.no_grad():
        copy.head.weight.mul_(3.0)  # not the null class's predictions, so its samples tell it apart
    copy_path = Path(copy_section.out_dir) / "transformer.safetensors"
    copy_path.parent.mkdir(parents=True)
    save_transformer(copy, str(copy_path), extra={"tokenizer_sha256": sha256_file(tok_path)})
    return params


@pytest.fixture(scope="module")
def logged(store, micro):
    with tracking.stage_run("publish") as t:
        return publish.log_model.fn(micro, t.run_id)


def _load(uri):
    import mlflow

    return mlflow.pyfunc.load_model(uri)


def test_models_are_logged_from_code_with_signatures_weights_and_pins(logged, micro):
    import mlflow

    gen = mlflow.models.get_model_info(logged)
    sig = gen.signature
    assert sig.inputs.to_dict() == [{"type": "long", "required": True}]
    assert [c.name for c in sig.outputs.inputs] == ["class_id", "image_png"]
    defaults = {p.name: p.default for p in sig.params.params}
    # the sampling the evaluate stage used: transformer.sampling, with evaluate.cfg_scale on top
    assert defaults == {
        "temperature": 0.9,
        "top_k": 32,
        "top_p": 1.0,
        "cfg_scale": 2.5,
        "seed": 3,
        "batch_size": 8,
        # the unconditional copy's draws (class id -1): with no search, the params' own
        "uncond_temperature": 0.9,
        "uncond_top_k": 32,
        "uncond_top_p": 1.0,
    }

    local = Path(mlflow.artifacts.download_artifacts(logged))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("pyfunc_models.py")  # models-from-code, nothing pickled
    assert not list(local.rglob("*.pkl"))
    weights = sorted(p.name for p in local.rglob("*.safetensors"))
    assert weights == ["tokenizer.safetensors", "transformer.safetensors", "transformer_uncond.safetensors"]
    assert (local / "code" / "vim_core" / "transformer" / "sampling.py").is_file()
    assert not list((local / "code").rglob("*.npz"))  # the embedded dataset stays out
    reqs = (local / "requirements.txt").read_text().split()
    assert f"mlflow=={mlflow.__version__}" in reqs
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs


def test_generator_takes_class_ids_and_sampling_options(logged):
    from mlflow.exceptions import MlflowException

    gen = _load(logged)
    out = gen.predict(pd.DataFrame({"class_id": [4, 0, 9]}))
    assert list(out.columns) == ["class_id", "image_png"] and list(out.class_id) == [4, 0, 9]
    assert all(decode_png(s).shape == (32, 32) for s in out.image_png)
    assert list(gen.predict([4, 0, 9]).image_png) == list(out.image_png)  # the defaults hold a seed
    assert list(gen.predict(np.array([4, 0, 9])).image_png) == list(out.image_png)
    options = {"seed": 5, "temperature": 1.2, "top_k": 0, "top_p": 0.8, "cfg_scale": 1.0}
    other = gen.predict([4, 0, 9], params=options)
    assert list(other.image_png) != list(out.image_png)
    assert list(gen.predict([4, 0, 9], params=options).image_png) == list(other.image_png)
    with pytest.raises(MlflowException, match=r"-1\.\.9 \(-1: an unconditional image\)") as err:
        gen.predict([3, 10])
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="temperature"):
        gen.predict([1], params={"temperature": -1.0})


def test_class_id_minus_one_is_drawn_by_the_unconditional_copy(logged, micro):
    """-1 samples the copy (not the null class), each id's image stays what it is alone; a version
    without a copy refuses -1."""
    from mlflow.exceptions import MlflowException

    from vim_core.tokenizer.export import load_tokenizer
    from vim_core.transformer.export import load_transformer
    from vim_core.transformer.requests import sampling_options
    from vim_core.transformer.sampling import sample

    gen = _load(logged)
    mixed = gen.predict([-1, 4, -1])
    assert list(mixed.class_id) == [-1, 4, -1]
    assert mixed.image_png[1] == gen.predict([4]).image_png[0]  # a class's draw is not moved by -1s
    assert list(gen.predict([-1, -1]).image_png) == [mixed.image_png[0], mixed.image_png[2]]
    hotter = gen.predict([-1, 4], params={"uncond_temperature": 1.5, "uncond_top_k": 0})  # -1's own options
    assert hotter.image_png[0] != mixed.image_png[0] and hotter.image_png[1] == mixed.image_png[1]
    with pytest.raises(MlflowException, match="temperature must be in") as err:
        gen.predict([4], params={"uncond_temperature": -1.0})  # refused even with no -1 to draw
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    # the copy's draws, and not the null class's, with the generator's defaults (no guidance)
    tokenizer = load_tokenizer(str(Path(micro.tokenizer.out_dir) / "tokenizer.safetensors")).eval()
    defaults = {"temperature": 0.9, "top_k": 32, "top_p": 1.0, "cfg_scale": 1.0, "seed": 3, "batch_size": 8}
    for file, is_copy in (("uncond/transformer.safetensors", True), ("transformer.safetensors", False)):
        model = load_transformer(str(Path(micro.transformer.out_dir) / file))[0]
        opts = sampling_options(defaults, 2, model.vocab_size)
        pixels = tokenizer.decode_uint8(sample(model, 2, None, **opts))  # None: the VIM's null class
        drawn = [decode_png(s).tolist() for s in mixed.image_png[::2]]
        assert [d == p[0].tolist() for d, p in zip(drawn, pixels, strict=True)] == [is_copy, is_copy]
    without = micro.model_copy(update={"transformer": micro.transformer.model_copy(update={"uncond": None})})
    with tracking.stage_run("publish") as t:
        plain = _load(publish.log_model.fn(without, t.run_id))
    with pytest.raises(MlflowException, match=r"0\.\.9, got \[-1\]") as err:
        plain.predict([-1])
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def test_tokenizer_and_transformer_load_from_the_registered_model(logged, micro):
    """The one-liners of docs/operations.md, run as written against a registered version of `vim`."""
    import mlflow

    from vim_core.tokenizer.export import load_tokenizer
    from vim_core.transformer.export import load_transformer

    version = mlflow.register_model(logged, "vim")
    mlflow.MlflowClient().set_registered_model_alias("vim", "champion", version.version)
    # -- as in docs/operations.md
    tokenizer = load_tokenizer(mlflow.artifacts.download_artifacts("models:/vim@champion") + "/artifacts/tokenizer.safetensors")  # fmt: skip
    transformer, _ = load_transformer(mlflow.artifacts.download_artifacts("models:/vim@champion") + "/artifacts/transformer.safetensors")  # fmt: skip
    # --
    tok_file = str(Path(micro.tokenizer.out_dir) / "tokenizer.safetensors")
    vim_file = str(Path(micro.transformer.out_dir) / "transformer.safetensors")
    for got, want in ((tokenizer, load_tokenizer(tok_file)), (transformer, load_transformer(vim_file)[0])):
        assert got.state_dict().keys() == want.state_dict().keys()
        assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    with torch.inference_mode():
        tokens = tokenizer.eval().encode(to_model_range(images))
    assert tokens.shape == (3, 64)


def test_stage_params_are_the_sections_dvc_yaml_names(micro):
    got = stage_params(micro, "evaluate", REPO / "dvc.yaml")
    assert set(got) == {"seed", "evaluate", "transformer"} and set(got["transformer"]) == {
        "sampling",
        "probe",
    }
    assert got["transformer"]["sampling"]["top_k"] == 32
    assert set(stage_params(micro, "train_tokenizer", REPO / "dvc.yaml")) == {"seed", "tokenizer"}
    assert stage_params(micro, "no_such_stage", REPO / "dvc.yaml") == micro.model_dump(mode="json")


def test_tracked_stage_logs_params_metrics_and_plots_dvc_yaml_declares(store, micro, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "plots").mkdir()
    (tmp_path / "metrics").mkdir()
    Path("dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "evaluate": {
                        "cmd": "true",
                        "params": ["seed", "transformer.sampling"],
                        "metrics": [{"metrics/eval.json": {"cache": False}}],
                        "plots": [
                            {"plots/grid.png": {"cache": False}},
                            "plots/loss.csv",
                            "plots/missing.png",
                        ],
                    }
                }
            }
        )
    )
    with tracked_stage("evaluate", micro) as t:
        t.log_metrics({"loss/total": 2.0}, step=3)
        report = {"fid_domain": 12.5, "ok": True, "timings": {"total": 3.0}, "definitions": {"samples": 20}}
        Path("metrics/eval.json").write_text(json.dumps(report))
        Image.fromarray(np.full((4, 4), 7, np.uint8)).save("plots/grid.png")
        Path("plots/loss.csv").write_text("step,total\n0,1.0\n")
    c = mlflow_run.client()
    run = c.get_run(t.run_id)
    assert run.data.params["transformer.sampling.temperature"] == "0.9" and run.data.params["seed"] == "3"
    assert "tokenizer.train.steps" not in run.data.params
    assert run.data.metrics == {"loss/total": 2.0, "fid_domain": 12.5, "timings/total": 3.0}
    arts = {a.path for d in ("images", "metrics", "plots") for a in c.list_artifacts(t.run_id, d)}
    assert arts == {"images/grid.png", "metrics/eval.json", "plots/loss.csv"}


def test_tracking_off_is_vim_cores_null_tracker(micro, monkeypatch, tmp_path):
    monkeypatch.setenv(mlflow_run.SWITCH_ENV, "off")
    monkeypatch.chdir(tmp_path)
    with tracked_stage("evaluate", micro) as t:
        assert isinstance(t, NullTracker) and t.run_id is None
        assert isinstance(tracking.tracker_for(None), NullTracker)
    with pytest.raises(VimError, match="tracking on"):
        publish.publish_pipeline(micro)


def test_publish_refuses_missing_or_stale_eval_metrics(micro, monkeypatch, tmp_path):
    from vim_core.data.prepare import prepare
    from vim_core.eval.report import eval_config_hash

    monkeypatch.chdir(tmp_path)
    with pytest.raises(VimError, match="metrics/eval.json is missing"):
        publish.eval_metrics(micro)
    raw = stage2_params(tmp_path)
    raw["data"]["max_images"] = 200
    params = parse_params(raw)
    prepare(params.data)
    Path("metrics").mkdir()
    Path("metrics/eval.json").write_text(json.dumps({"fid_domain": 3.0, "eval_config_hash": "0" * 16}))
    with pytest.raises(VimError, match="run dvc repro first"):
        publish.eval_metrics(params)
    current = eval_config_hash(params)
    Path("metrics/eval.json").write_text(
        json.dumps({"fid_domain": 3.0, "ok": True, "note": "x", "eval_config_hash": current})
    )
    assert publish.eval_metrics(params) == ({"fid_domain": 3.0}, current)


def test_deployment_schedule_comes_from_argument_environment_or_default(monkeypatch, tmp_path):
    from flows import deploy

    monkeypatch.chdir(tmp_path)

    assert deploy.POOL == "vim-process"
    monkeypatch.delenv("VIM_RETRAIN_CRON", raising=False)
    monkeypatch.delenv("VIM_RETRAIN_TIMEZONE", raising=False)
    default = deploy.schedule()
    assert (default.cron, default.timezone) == (deploy._from_params("cron") or deploy.DEFAULT_CRON, "UTC")
    monkeypatch.setenv("VIM_RETRAIN_CRON", "30 2 * * *")
    assert deploy.schedule().cron == "30 2 * * *"
    got = deploy.schedule("0 1 * * 0", "Europe/Paris")
    assert (got.cron, got.timezone) == ("0 1 * * 0", "Europe/Paris")
    with pytest.raises(VimError, match="Invalid cron string") as err:
        deploy.schedule("61 * * * *")
    assert "\n" not in str(err.value)
    assert deploy.main(["--cron", "not a cron"]) == 1  # one line on stderr, nothing served
    assert Path.cwd() == tmp_path


def test_a_searched_guidance_scale_is_served_only_from_the_eval_json_of_these_params(micro, tmp_path):
    from vim_core.config.pipeline import SamplingSearchConfig
    from vim_core.data.prepare import prepare

    assert publish.evaluated_sampling(micro) == {}  # no search: params say how evaluate sampled
    searched = micro.model_copy(deep=True)
    searched.evaluate.sampling_search = SamplingSearchConfig()
    searched.data.out_dir, searched.data.max_images = str(tmp_path / "prepared"), 200
    prepare(searched.data)
    # this checkout's eval.json was scored with other settings: its pick is not these params'
    with pytest.raises(VimError, match="run dvc repro first"):
        publish.evaluated_sampling(searched)
