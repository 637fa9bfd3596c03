"""`dvc repro` on a temporary copy of the repo, with the real stage commands (Prefect ephemeral mode)."""

import os
import subprocess
import sys
import time
from pathlib import Path

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
