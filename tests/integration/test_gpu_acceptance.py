"""benchmarks/gpu_acceptance.sh: the --smoke run on the CPU, as CI runs it, and its refusal without CUDA.

The smoke run is real: tiny models train and sample, and the tokenizer and Transformer trainers run
under torchrun with 2 gloo ranks. Only its numbers mean nothing.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_acceptance import PartFailed, PartTimeout, gpu_params, main, throughput_part, time_limit
from vim_core.config import parse_params

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.sh"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    clean |= {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=clean, text=True, capture_output=True, timeout=300
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("acceptance") / "out"
    return _run("--smoke", "--out", str(out)), out


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_smoke_run_succeeds_and_writes_the_json_it_prints(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # stdout is the one JSON object, nothing else
    assert json.loads((out / "gpu_acceptance.json").read_text()) == report
    assert report["ok"] and report["smoke"] and report["failed"] == []
    assert list(report["parts"]) == ["throughput", "sampling", "torchrun"]
    for name, part in report["parts"].items():
        assert part["ok"] and part["error"] is None, (name, part["error"])
        assert _positive(part["seconds"]) and part["seconds"] <= part["limit_s"]
    assert report["device"] and report["torch"] == torch.__version__
    assert _positive(report["total_seconds"])
    assert sum(p["seconds"] for p in report["parts"].values()) <= report["total_seconds"]


def test_smoke_throughput_and_sampling_are_finite_and_positive(smoke):
    parts = json.loads(smoke[0].stdout)["parts"]
    tok, vim = parts["throughput"]["result"]["tokenizer"], parts["throughput"]["result"]["transformer"]
    for value in (tok["train_images_per_s"], tok["train_tokens_per_s"], tok["encode_images_per_s"]):
        assert _positive(value)
    assert _positive(vim["tokens_per_s"]) and _positive(vim["images_per_s"])
    assert _positive(tok["flops_per_step_counted"]) and _positive(vim["flops_per_step_counted"])
    sampling = parts["sampling"]["result"]
    for dtype in ("float32", "bfloat16"):
        row = sampling[dtype]
        assert row["dtype"] == dtype and row["tokens_per_image"] == 64
        assert _positive(row["tokens_per_s"]) and _positive(row["images_per_s"])
        assert row["tokens_per_s"] == pytest.approx(row["images_per_s"] * 64, rel=0.01)


def test_smoke_torchrun_trains_the_tokenizer_on_2_ranks(smoke):
    proc, out = smoke
    result = json.loads(proc.stdout)["parts"]["torchrun"]["result"]
    assert result["rc"] == 0 and result["ranks"] == 2 and result["backend"] == "gloo"
    assert list(result["stages"]) == ["tokenizer"]  # the GPU run also launches the Transformer's
    stage = result["stages"]["tokenizer"]
    # world_size and steps come from the metrics the trainer itself wrote
    assert stage["rc"] == 0 and stage["world_size"] == 2 and stage["steps"] == 4
    assert _positive(stage["wall_s"]) and Path(stage["log"]).is_file()
    assert not [p for p in out.iterdir() if p.is_dir()]  # the work dir (data, checkpoints) is gone


def test_without_cuda_and_without_smoke_it_exits_2_with_one_line(tmp_path):
    proc = _run("--out", str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "--smoke" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_torchrun_params_validate(tmp_path):
    """The GPU run's trainer config (params.yaml cut short) is only trained on a GPU; it must parse here."""
    params = parse_params(gpu_params(tmp_path))
    for section in (params.tokenizer, params.transformer):
        t = section.train
        assert (t.steps, t.bf16, t.compile, t.device) == (20, True, True, "cuda")
        assert Path(section.out_dir).parent == tmp_path and Path(section.checkpoint_dir).parent == tmp_path
    assert params.tokenizer.loss.adversarial_start_step < 20  # the GAN phase is trained too
    assert Path(params.data.out_dir).parent == tmp_path and params.data.max_images == 1200


def test_a_part_past_its_limit_fails_with_what_it_measured(tmp_path):
    with pytest.raises(PartFailed) as failed, time_limit(0.2):
        throughput_part(True, None, tmp_path)  # several seconds of tiny training steps
    assert str(failed.value).startswith("tokenizer: PartTimeout: ran past its 0 s limit")
    assert failed.value.result == {}  # it stopped in the first model


def test_a_dropped_timeout_is_raised_again():
    """Python drops an exception raised in a weakref callback or __del__; the alarm then fires again."""
    import time

    dropped = 0
    with pytest.raises(PartTimeout), time_limit(0.1):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                time.sleep(0.01)
            except PartTimeout:  # the first one lost, as in a callback
                dropped += 1
                if dropped > 1:
                    raise
    assert dropped == 2


def test_spent_budget_records_every_part_and_exits_1(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = main(["--smoke", "--budget-s", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # --smoke set 1 for this process
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and not report["ok"] and report["failed"] == ["throughput", "sampling", "torchrun"]
    for part in report["parts"].values():
        assert not part["ok"] and part["error"].startswith("skipped") and part["result"] is None
    assert json.loads((tmp_path / "gpu_acceptance.json").read_text()) == report
