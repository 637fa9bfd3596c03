"""`dvc repro` on a temporary copy of the repo, with the real stage commands: plain Python, no Prefect."""

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


def _prefect_processes(root: int) -> list[str]:
    """The command lines of root's descendants that run Prefect (a server, a client, uvicorn)."""
    import psutil

    found = []
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "prefect" in cmd or "uvicorn" in cmd:
            found.append(cmd)
    return found


@pytest.mark.slow  # the micro pipeline, every stage: about a minute on 2 cores
def test_plain_dvc_repro_runs_no_prefect(tmp_path):
    """Every stage process of a whole `dvc repro` imports no Prefect module (Python's own import log,
    PYTHONPROFILEIMPORTTIME, names each module a process imports) and no Prefect process appears."""
    from tests.integration.test_orchestration_pipeline import tiny_repo

    repo = tiny_repo(tmp_path / "repo")
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "VIM_TRACKING": "off",
        "OMP_NUM_THREADS": "1",
        "PYTHONPROFILEIMPORTTIME": "1",  # -X importtime for every Python process under dvc
    }
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "repro.log"
    seen: set[str] = set()
    with open(log, "w") as out:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            seen.update(_prefect_processes(proc.pid))
            time.sleep(0.1)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in text.splitlines() if line.startswith("import time:")
    ]
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert imported.count("flows.common") == len(stages)  # the log covers each stage process
    assert not [m for m in imported if m.split(".")[0] == "prefect"]
    assert not seen
