"""`dvc repro` on a temporary copy of the repo, with the real stage commands (Prefect ephemeral mode)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def _run(cmd, cwd, **kw):
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "VIM_TRACKING": "off",
    }
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, **kw)


def test_dvc_repro_then_noop(repo_copy):
    first = _run(["dvc", "repro", "prepare_data"], repo_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    manifest = repo_copy / "data" / "prepared" / "manifest.json"
    assert manifest.is_file()
    assert (repo_copy / "metrics" / "data.json").is_file()
    start = time.monotonic()
    second = _run(["dvc", "repro", "prepare_data"], repo_copy)
    elapsed = time.monotonic() - start
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout.lower() or "didn't change" in second.stdout.lower()
    assert elapsed < 5.0, f"no-op repro took {elapsed:.1f}s"


def test_stage_command_bad_input_is_one_line(repo_copy):
    raw = yaml.safe_load((repo_copy / "params.yaml").read_text())
    raw["data"]["source"] = {"kind": "image_folder", "url": str(repo_copy / "no-such-folder")}
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    res = _run([sys.executable, "-m", "flows.prepare_data"], repo_copy)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: source {repo_copy / 'no-such-folder'}: not found"]
    assert "Traceback" not in res.stderr
    assert not (repo_copy / "data" / "prepared").exists()

    raw["data"]["image_size"] = "huge"
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    res = _run([sys.executable, "-m", "flows.prepare_data"], repo_copy)
    assert res.returncode == 2 and "data.image_size = 'huge'" in res.stderr


@pytest.mark.slow  # a minute: three dvc runs of the micro pipeline's first stages
def test_classifier_stage_is_reused_after_a_vim_change_and_by_exp_run_temp(tmp_path):
    """train_classifier depends on the prepared data and its own params only, and has no persist output,
    so a transformer.* change does not retrain it and `dvc exp run --temp` restores it from the run cache."""
    from tests.conftest import git_commit
    from tests.integration.test_orchestration_pipeline import tiny_repo

    repo = tiny_repo(tmp_path / "repo")
    first = _run(["dvc", "repro", "train_classifier"], repo)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'train_classifier'" in first.stdout
    assert (repo / "models" / "classifier" / "scorer.safetensors").is_file()
    git_commit(repo, "the classifier's lock")

    params = repo / "params.yaml"
    committed = params.read_text()
    raw = yaml.safe_load(committed)
    raw["transformer"]["train"]["steps"] += 1
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    status = _run(["dvc", "status", "train_classifier"], repo)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    again = _run(["dvc", "repro", "train_classifier"], repo)
    assert "Stage 'train_classifier' didn't change, skipping" in again.stdout, again.stdout + again.stderr
    raw["evaluate"]["classifier"]["epochs"] = 2  # its own params do invalidate it
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    changed = _run(["dvc", "status", "train_classifier"], repo)
    assert "evaluate.classifier" in changed.stdout, changed.stdout
    params.write_text(committed)

    # A new classifier setting trains once; a second experiment with it (and another VIM) reuses the
    # first one's run through DVC's run cache, though HEAD's dvc.lock knows neither.
    exp = ["dvc", "exp", "run", "--temp", "-S", "evaluate.classifier.epochs=2"]
    trained = _run([*exp, "train_classifier"], repo)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "Running stage 'train_classifier'" in trained.stdout
    reused = _run([*exp, "-S", "transformer.train.steps=41", "train_classifier"], repo)
    assert reused.returncode == 0, reused.stdout + reused.stderr
    assert "Running stage 'train_classifier'" not in reused.stdout
    assert "Stage 'train_classifier' is cached - skipping run" in reused.stdout + reused.stderr
