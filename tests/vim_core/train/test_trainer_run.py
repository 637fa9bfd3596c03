"""What the trainers share (vim_core.train.run, .flops): resume after SIGKILL, and budgets in FLOPs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.vim_core.transformer.test_transformer_stage import stage2_params
from vim_core.config import parse_params
from vim_core.errors import ConfigError, VimError
from vim_core.train.flops import count_flops, flops_until, resolve_budget
from vim_core.train.run import step_time_metrics
from vim_core.train.tokenizer_trainer import train_tokenizer
from vim_core.train.transformer_trainer import train_transformer

# (CLI command, params section, exported weights) per trainer.
TRAINERS = {
    "tokenizer": ("train-tokenizer", "tokenizer", "model/tokenizer.safetensors"),
    "transformer": ("pretrain-transformer", "transformer", "vim/transformer.safetensors"),
}


def _params(stage2: Path, work: Path, trainer: str, **train) -> dict:
    raw = stage2_params(stage2, steps=16)
    section = raw[TRAINERS[trainer][1]]
    if trainer == "tokenizer":
        raw["tokenizer"]["loss"]["adversarial_weight"] = 0.1  # resume through the GAN and R1 steps
        raw["tokenizer"]["loss"]["adversarial_start_step"] = 6
    section["train"] = {**section["train"], "steps": 16, **train}
    section["out_dir"] = str(work / TRAINERS[trainer][2].split("/")[0])
    section["checkpoint_dir"] = str(work / "ckpt")
    return raw


def _cli(trainer: str, work: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vim_core.cli", TRAINERS[trainer][0], "--params", "params.yaml"]
    cmd += ["--plots", "plots", "--metrics", "metrics.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow  # tests/faults/test_stage_kills.py kills each stage 5 times; this is its CLI-level twin
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_resume_after_sigkill_matches_uninterrupted_run(trainer, stage2, tmp_path):
    works = {}
    for name in ("straight", "killed"):
        work = tmp_path / name
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(_params(stage2, work, trainer)))
        works[name] = work
    straight = _cli(trainer, works["straight"])
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    work = works["killed"]
    proc = _cli(trainer, work)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(int(p.name.split("-")[1]) >= 8 for p in work.glob("ckpt/*/step-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "metrics.json").exists()
    saved = max(int(p.name.split("-")[1]) for p in work.glob("ckpt/*/step-*") if (p / "meta.json").exists())
    assert 8 <= saved < 16

    resumed = _cli(trainer, work)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["steps"] == 16 and metrics["resumed_from"] == saved
    a = load_file(str(works["straight"] / TRAINERS[trainer][2]))
    b = load_file(str(work / TRAINERS[trainer][2]))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_a_flop_budget_buys_the_steps_it_pays_for(stage2, tmp_path):
    """Both trainers: steps = budget / FLOPs per step, recorded beside the counted FLOPs."""
    by_steps = parse_params(_params(stage2, tmp_path / "a", "transformer", steps=6))
    counted = train_transformer(by_steps.transformer, seed=0).metrics
    per_step = counted["flops_per_step"]
    assert counted["train_flops"] == pytest.approx(6 * per_step) and per_step > 1e8

    raw = _params(stage2, tmp_path / "b", "transformer", steps=None, flops=9.5 * per_step)
    budgeted = train_transformer(parse_params(raw).transformer, seed=0).metrics
    assert budgeted["steps"] == 9 and budgeted["flops_budget"] == pytest.approx(9.5 * per_step)
    assert budgeted["train_flops"] == pytest.approx(9 * per_step)

    # The tokenizer's step costs more once the GAN is on: two phases, and the budget spans both.
    raw = _params(stage2, tmp_path / "c", "tokenizer", steps=12)
    tok = train_tokenizer(parse_params(raw).tokenizer, raw["data"]["out_dir"], seed=0).metrics
    (_, before), (start, after) = [
        (p["from_step"], p["flops_per_step"]) for p in tok["flops_per_step_phases"]
    ]
    assert start == 6 and after > before > 0
    assert tok["train_flops"] == pytest.approx(6 * before + 6 * after)
    # each phase's step time is recorded (the GAN phase also trains D, so it is the slower one)
    (p0, t0), (p1, t1) = [(p["from_step"], p["seconds"]) for p in tok["step_seconds_median"]]
    assert (p0, p1) == (0, 6) and t1 > t0 > 0 and tok["first_step_seconds"] > 0
    assert 0 < counted["step_seconds_median"] <= counted["train_seconds"]
    raw = _params(stage2, tmp_path / "d", "tokenizer", steps=None, flops=6 * before + 3.5 * after)
    tok = train_tokenizer(parse_params(raw).tokenizer, raw["data"]["out_dir"], seed=0).metrics
    assert tok["steps"] == 9 and tok["train_flops"] == pytest.approx(6 * before + 3 * after)
    assert "encode_images_per_s" in tok and tok["decode_images_per_s"] > 0


def test_budget_errors_are_one_line(stage2, tmp_path):
    raw = _params(stage2, tmp_path, "transformer", flops=1e12)  # steps stays 16: both set
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert err.value.lines == [
        "params.yaml: transformer.train = {...}: set steps or flops, not both (set steps: null to train on a "
        "FLOP budget)"
    ]
    t = parse_params(_params(stage2, tmp_path, "transformer", steps=None, flops=1e6)).transformer.train
    with pytest.raises(VimError, match=r"transformer.train.flops = 1e\+06 buys no training step"):
        resolve_budget(t, "transformer", [(0, 10**9)], world_size=1)
    t = parse_params(_params(stage2, tmp_path, "transformer", steps=None, flops=3e9)).transformer.train
    with pytest.raises(VimError, match="3 steps from the budget, but decay_start"):
        resolve_budget(t, "transformer", [(0, 10**9)], world_size=1)


def test_flops_until_and_cpu_attention_are_counted():
    assert flops_until([(0, 10), (4, 100)], 3) == 30
    assert flops_until([(0, 10), (4, 100)], 6) == 40 + 200
    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    one_matmul = count_flops(lambda: q @ q.transpose(-1, -2))
    attn = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward())
    # torch's formula: QK^T and PV forward, then four gradient matmuls and the recomputed scores backward.
    assert one_matmul == 2 * 2 * 4 * 64 * 64 * 16 and attn == 7 * one_matmul
    before = torch.get_rng_state()
    count_flops(lambda: torch.rand(3))
    assert torch.equal(torch.get_rng_state(), before), "counting must not move the run's RNG"


def test_step_time_metrics_skip_each_phases_warm_up():
    """The median leaves out a phase's first 3 steps (compilation) once the phase has more than 6."""
    times = [9.0, 9.0, 9.0] + [1.0] * 5 + [7.0, 7.0, 7.0] + [2.0] * 5
    m = step_time_metrics(times, [(0, 10), (8, 20)], start=0)
    assert m["first_step_seconds"] == 9.0
    assert m["step_seconds_median"] == [{"from_step": 0, "seconds": 1.0}, {"from_step": 8, "seconds": 2.0}]
    # resumed at step 10: only the GAN phase ran, and a short phase keeps all its steps
    assert step_time_metrics([4.0, 2.0, 3.0], [(0, 10), (8, 20)], start=10)["step_seconds_median"] == [
        {"from_step": 8, "seconds": 3.0}
    ]
    assert step_time_metrics([], [(0, 1)], 0) == {}
