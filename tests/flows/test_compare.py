"""flows.compare against a real `mlflow server`: real logged runs, real registry versions, real PNG grids."""

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from flows import compare, mlflow_run, publish, tracking
from flows.registry import compare_and_promote, register_challenger
from vim_core.io import spec_hash

ECHO = Path(__file__).resolve().parents[1] / "assets" / "echo_model.py"
EVAL = spec_hash({"split": "test", "samples": 20, "extractor": "domain", "seed": 0})
MLFLOW_EXPERIMENT = "compare-tests"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tracking_env):
    return tracking_env


def _grid(mnist, path: Path, offset: int = 0) -> Path:
    """A real sample grid, as the evaluate stage writes one: two MNIST digits per class, a column each."""
    images, labels = mnist
    picks = [np.flatnonzero(labels == c)[offset + k] for k in range(2) for c in range(10)]
    x = torch.from_numpy(images[picks]).float().div(255).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    save_image(make_grid(x, nrow=10, padding=1), path)
    return path


def pipeline(tmp_path, mnist, name, fid, acc, usage, bits, register=True, offset=0, params=None) -> dict:
    """One pipeline run with its transformer and evaluate stages, as the stages log them; the evaluate
    stage logs `params`, a sample grid, and a pyfunc model that is registered as the challenger bundle."""
    import mlflow

    grid = _grid(mnist, tmp_path / f"samples_per_class-{uuid.uuid4().hex[:4]}.png", offset)
    with mlflow_run.pipeline_run("pipeline") as parent:
        with tracking.stage_run("pretrain_transformer") as t:
            t.log_metrics({"val_bits_per_token": bits, "steps": 40}, step=0)
        with tracking.stage_run("evaluate", params) as t:
            metrics = {
                "fid_domain_val": fid + 1.0,  # the promotion decides on val (here: test FID + 1)
                "class_accuracy_val": acc,
                "fid_domain": fid,
                "class_accuracy": acc,
                "codebook_usage": usage,
                "psnr": 21.5,
                "rfid_domain": 3.25,
            }
            t.log_metrics(metrics, step=0)
            t.log_image(grid, "samples_per_class")
            versions = None
            if register:
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(ECHO), pip_requirements=["mlflow"]
                )
                versions = register_challenger(info.model_uri, metrics, t.run_id, eval_hash=EVAL, name=name)
            evaluate = t.run_id
    return {"parent": parent, "evaluate": evaluate, "versions": versions, "grid": grid, "metrics": metrics}


def _cells(table: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}


def test_compare_two_runs_prints_and_writes_table_and_grids(env, mnist, name, tmp_path, capsys):
    a = pipeline(tmp_path, mnist, name, fid=30.0, acc=0.5, usage=0.25, bits=3.5, register=False)
    b = pipeline(tmp_path, mnist, name, offset=2, fid=12.5, acc=0.875, usage=0.75, bits=2.0, register=False)
    out = tmp_path / "out"
    # a pipeline run brings its stages' metrics; a stage run brings its siblings'
    assert compare.main([a["parent"], b["evaluate"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _cells(printed)
    assert rows["fid_domain"] == ["30", "12.5"] and rows["class_accuracy"] == ["0.5", "0.875"]
    assert rows["codebook_usage"] == ["0.25", "0.75"] and rows["val_bits_per_token"] == ["3.5", "2"]
    assert rows["psnr"] == ["21.5", "21.5"] and rows["rfid_domain"] == ["3.25", "3.25"]
    md = (out / "comparison.md").read_text()
    assert "| fid_domain | 30 | 12.5 |" in md and "| val_bits_per_token | 3.5 | 2 |" in md
    assert f"runs:/{a['evaluate']}/images/samples_per_class.png" in md
    assert "![sample grids](comparison.png)" in md
    png = Image.open(out / "comparison.png")
    one = Image.open(_grid(mnist, tmp_path / "one.png"))
    assert png.width >= 2 * one.width and png.height >= one.height
    # the two grids are the two runs' own: the left tile is not the right one
    arr = np.asarray(png.convert("L"))
    half = arr.shape[1] // 2
    assert not np.array_equal(arr[:, :half], arr[:, half : 2 * half])
    assert not list(out.glob(".*.tmp"))  # written atomically: no temp files left


def test_versions_aliases_and_champion_flag(env, mnist, name, tmp_path, capsys):
    first = pipeline(tmp_path, mnist, name, fid=20.0, acc=0.95, usage=0.5, bits=3.0)
    assert compare_and_promote(name)["outcome"] == "promoted"
    pipeline(tmp_path, mnist, name, offset=2, fid=15.0, acc=0.96, usage=0.625, bits=2.5)
    assert compare.main(["--champion", "--model", name, "--out", str(tmp_path / "c")]) == 0
    rows = _cells(capsys.readouterr().out)
    assert rows["fid_domain"] == ["20", "15"] and rows["val_bits_per_token"] == ["3", "2.5"]
    assert rows["fid_domain_val"] == ["21", "16"] and rows["class_accuracy_val"] == ["0.95", "0.96"]
    md = (tmp_path / "c" / "comparison.md").read_text()
    assert f"{name} v1 (champion)" in md and f"{name} v2 (challenger)" in md
    # the same two by number and by bare NAME@alias, mixed with a run id
    assert (
        compare.main([f"models:/{name}/1", f"{name}@challenger", first["parent"], "--out", str(tmp_path)])
        == 0
    )
    rows = _cells(capsys.readouterr().out)
    assert rows["fid_domain"] == ["20", "15", "20"]
    assert Image.open(tmp_path / "comparison.png").width > 3 * 50


def test_bad_input_is_one_line_and_nonzero(env, mnist, name, tmp_path):
    a = pipeline(tmp_path, mnist, name, fid=30.0, acc=0.5, usage=0.25, bits=3.5, register=False)
    cases = {
        (a["parent"],): "two or more",
        (): "two or more",
        (a["parent"], "0123456789abcdef0123456789abcdef"): "no such MLflow run",
        (a["parent"], f"models:/{name}/7"): "no such registered model version",
        (a["parent"], "models:/m-123"): "expected models:/NAME/VERSION",
    }
    for args, message in cases.items():
        out = subprocess.run(
            [sys.executable, "-m", "flows.compare", *args, "--out", str(tmp_path / "bad")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.strip().count("\n") == 0 and message in out.stderr, (args, out.stderr)
    assert not (tmp_path / "bad").exists()


def test_promotion_attaches_the_comparison_to_the_challenger_version(env, mnist, name, tmp_path):
    pipeline(tmp_path, mnist, name, fid=20.0, acc=0.95, usage=0.5, bits=3.0)
    first = compare_and_promote(name)
    assert compare.attach_to_version(first) is None  # nothing to compare with yet
    second = pipeline(tmp_path, mnist, name, offset=2, fid=15.0, acc=0.96, usage=0.625, bits=2.5)
    decision = compare_and_promote(name)
    assert decision["outcome"] == "promoted"
    publish.compare_with_champion(decision)  # what flows.publish does after promoting
    c = mlflow_run.client()
    run = second["evaluate"]  # where the challenger's model was logged
    assert {f.path for f in c.list_artifacts(run, "comparison")} == {
        "comparison/comparison.md",
        "comparison/comparison.png",
    }
    md = Path(c.download_artifacts(run, "comparison/comparison.md", str(tmp_path))).read_text()
    assert "| fid_domain | 20 | 15 |" in md
    mv = c.get_model_version(name, "2")
    assert mv.tags[compare.COMPARISON_TAG] == f"runs:/{run}/comparison/comparison.md"
    assert "| fid_domain | 20 | 15 |" in mv.description and "champion v1" in mv.description


def test_a_comparison_that_cannot_be_made_is_a_warning_after_promotion(env, name, caplog):
    """publish has already moved the aliases; a missing version makes a warning, not a failed publish."""
    decision = {"model": name, "champion_before": "1", "challenger": "2"}
    with caplog.at_level("WARNING", logger="vim.publish"):
        publish.compare_with_champion(decision)
    assert "could not attach the comparison" in caplog.text
