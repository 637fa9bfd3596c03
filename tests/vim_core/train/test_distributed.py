"""DDP helpers: no-ops in a plain process, and a real 2-rank gloo run under torchrun that must match
single-process training on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vim_core.errors import VimError
from vim_core.train import distributed as vdist
from vim_core.train.loop import enable_tf32

REPO = Path(__file__).resolve().parents[3]
TOY = REPO / "tests" / "scripts" / "train_toy.py"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_single_process_is_a_no_op(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = vdist.init_distributed("cpu")
    assert info == vdist.DistInfo(0, 1, 0, torch.device("cpu"))
    assert info.is_main and not info.distributed and vdist.is_main() and not vdist.is_dist()
    t = torch.tensor([1.0, 3.0])
    assert vdist.all_reduce_mean(t) is t
    lin = nn.Linear(2, 2)
    assert vdist.wrap_ddp(lin, info) is lin
    before = lin.weight.clone()
    vdist.broadcast_module(lin)
    vdist.barrier()
    assert torch.equal(lin.weight, before)
    assert vdist.all_gather_objects({"a": 1}) == [{"a": 1}]
    means = vdist.all_reduce_mean_dict({"x": torch.tensor(2.5, requires_grad=True), "y": 4})
    assert {k: float(v) for k, v in means.items()} == {"x": 2.5, "y": 4.0} and vdist.all_reduce_mean_dict(
        {}
    ) == {}
    lin(torch.ones(1, 2)).sum().backward()
    grad = lin.weight.grad.clone()
    vdist.all_reduce_grads(lin)
    assert torch.equal(lin.weight.grad, grad)
    assert vdist.unwrap(torch.compile(lin)) is lin
    vdist.cleanup()


def test_bad_launch_env_is_one_line(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(VimError, match="MASTER_ADDR/MASTER_PORT are unset"):
        vdist.init_distributed("cpu")
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(VimError, match="RANK='zero' is not an integer"):
        vdist.init_distributed("cpu")
    with pytest.raises(VimError, match="device must be"):
        vdist.init_distributed("gpu")


def test_device_flag_picks_the_device_or_says_why_not(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert vdist.init_distributed("cpu").device == torch.device("cpu")
    with pytest.raises(VimError, match="device must be auto, cpu or cuda, got 'tpu'"):
        vdist.init_distributed("tpu")
    precision = torch.get_float32_matmul_precision()
    if torch.cuda.is_available():
        device = vdist.init_distributed("auto").device
        assert device == torch.device("cuda", 0) == vdist.init_distributed("cuda").device
        enable_tf32(device)
        assert torch.get_float32_matmul_precision() == "high"
        torch.set_float32_matmul_precision(precision)
    else:
        assert vdist.init_distributed("auto").device == torch.device("cpu")
        with pytest.raises(VimError, match="device=cuda was requested but torch sees no CUDA device"):
            vdist.init_distributed("cuda")
        enable_tf32(torch.device("cpu"))  # a no-op off CUDA
        assert torch.get_float32_matmul_precision() == precision


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(stdout: str) -> list[float]:
    return [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")]


def test_ddp_two_ranks_match_single_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = ["--steps", "24", "--every", "8", "--batch", "16"]
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
         str(TOY), "--ckpt-dir", "ddp_ck", "--out", "ddp", *common],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    single = subprocess.Popen(
        [sys.executable, str(TOY), "--ckpt-dir", "one_ck", "--out", "one", *common],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    ddp_out, ddp_err = ddp.communicate(timeout=120)
    one_out, one_err = single.communicate(timeout=120)
    assert ddp.returncode == 0, ddp_err[-3000:]
    assert single.returncode == 0, one_err[-3000:]

    r0, r1 = load_file(tmp_path / "ddp.rank0.safetensors"), load_file(tmp_path / "ddp.rank1.safetensors")
    for k in r0:  # model, EMA and a broadcast probe: identical on both ranks
        assert torch.equal(r0[k], r1[k]), k

    # Rank 0 logs the all-reduced loss, which must be the single process's loss on the whole batch.
    ddp_losses, one_losses = _losses(ddp_out), _losses(one_out)
    assert len(ddp_losses) == len(one_losses) == 24
    for step, (a, b) in enumerate(zip(ddp_losses, one_losses, strict=True)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7), step
    assert ddp_losses[-1] < 0.5 * ddp_losses[0]  # it learned something
    one = load_file(tmp_path / "one.rank0.safetensors")
    for k in one:
        if k.startswith("model."):
            torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5)

    # Checkpoints from the DDP run: written once, keys without DDP's "module." prefix, one RNG state per rank.
    ck = tmp_path / "ddp_ck"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000016", "step-00000024"]
    assert set(load_file(ck / "step-00000024" / "model.safetensors")) == {
        "0.weight",
        "0.bias",
        "3.weight",
        "3.bias",
    }
    state = torch.load(ck / "step-00000024" / "state.pt", weights_only=True)
    assert (
        len(state["rng"]) == 2 and json.loads((ck / "step-00000024" / "meta.json").read_text())["step"] == 24
    )


def test_a_checkpoint_write_failing_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 cannot write (the checkpoint dir's parent is a file): every rank stops with the cause. Before,
    rank 1 met a dead peer at the barrier (gloo: a lost-connection error; NCCL: a wait for the timeout)."""
    (tmp_path / "a_file").write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
         str(TOY), "--ckpt-dir", "a_file/ck", "--out", "ddp", "--steps", "8", "--every", "4"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert ddp.returncode != 0
    assert "checkpoint write failed" in ddp.stderr
    assert "another rank could not save the checkpoint" in ddp.stderr, ddp.stderr[-3000:]
    assert not list(tmp_path.glob("ddp.rank*.safetensors"))
