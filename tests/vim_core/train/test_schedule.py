"""LR schedules and the small training-step pieces of vim_core.train.loop (EMA, finiteness, clipping,
AMP, seeding, resumable data)."""

import math
import random
from itertools import islice

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from vim_core.config.pipeline import TokenizerSection, TransformerSection
from vim_core.config.schedule import (
    PAPER_TOKENIZER_SCHEDULE,
    PAPER_VIM_SCHEDULE,
    CosineSchedule,
    ExponentialSchedule,
    LRSchedule,
)
from vim_core.errors import VimError
from vim_core.train.loop import (
    EMA,
    autocast_context,
    check_finite,
    clip_grad,
    resumable_batches,
    set_seed,
)
from vim_core.train.schedule import lr_multiplier, make_scheduler

# ---------------------------------------------------------------- schedules


def test_paper_tokenizer_cosine():
    s, total = PAPER_TOKENIZER_SCHEDULE, 500_000
    assert s.lr_at(0, total) == pytest.approx(1e-4 / 50_000)
    assert s.lr_at(24_999, total) == pytest.approx(0.5e-4)
    assert s.lr_at(49_999, total) == pytest.approx(1e-4)  # warmup done
    assert s.lr_at(50_000, total) == pytest.approx(1e-4)  # cosine starts at the peak
    mid = 50_000 + (total - 1 - 50_000) // 2
    assert s.lr_at(mid, total) == pytest.approx((1e-4 + 5e-5) / 2, rel=1e-5)  # mid is half a step early
    assert s.lr_at(total - 1, total) == pytest.approx(5e-5, rel=1e-12)
    assert s.lr_at(total + 10, total) == pytest.approx(5e-5)
    lrs = [s.lr_at(i, total) for i in range(50_000, total, 997)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay


def test_paper_vim_exponential():
    s, total = PAPER_VIM_SCHEDULE, 450_000
    assert s.lr_at(0, total) == pytest.approx(4.5e-4 / 5_000)
    assert s.lr_at(4_999, total) == pytest.approx(4.5e-4)
    assert s.lr_at(40_000, total) == pytest.approx(4.5e-4)  # flat until the decay starts
    assert s.lr_at(80_000, total) == pytest.approx(4.5e-4)
    half = 80_000 + (total - 1 - 80_000) // 2
    assert s.lr_at(half, total) == pytest.approx(math.sqrt(4.5e-4 * 1e-5), rel=1e-4)  # geometric midpoint
    assert s.lr_at(total - 1, total) == pytest.approx(1e-5, rel=1e-12)


def test_lambdalr_follows_schedule_and_keeps_group_ratios():
    sched_cfg = ExponentialSchedule(peak_lr=1e-2, final_lr=1e-4, warmup_steps=3, decay_start=5)
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(
        [{"params": [a]}, {"params": [b], "lr": 10 * sched_cfg.peak_lr}], lr=sched_cfg.peak_lr
    )
    sched = make_scheduler(opt, sched_cfg, total_steps=12)
    used = []
    for _ in range(12):
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, (lr_a, lr_b) in enumerate(used):
        assert lr_a == pytest.approx(sched_cfg.lr_at(step, 12))
        assert lr_b == pytest.approx(10 * lr_a)
    assert used[-1][0] == pytest.approx(1e-4)
    assert sched.state_dict()["lr_lambdas"] == [
        None,
        None,
    ]  # a closure: nothing unpicklable in the checkpoint


def test_schedule_validation():
    with pytest.raises(ValidationError, match="must not exceed peak_lr"):
        CosineSchedule(peak_lr=1e-4, final_lr=1e-3)
    with pytest.raises(ValidationError, match="decay_start"):
        ExponentialSchedule(warmup_steps=10, decay_start=5)
    with pytest.raises(ValidationError):
        ExponentialSchedule(final_lr=0.0)  # log-space decay needs a positive floor
    with pytest.raises(ValidationError):
        CosineSchedule(warmup_steps=-1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        CosineSchedule(peak=1e-4)
    with pytest.raises(VimError, match=r"warmup_steps \(50000\).*total steps \(300\)"):
        lr_multiplier(PAPER_TOKENIZER_SCHEDULE, 300)
    with pytest.raises(VimError, match=r"decay_start \(80000\)"):
        lr_multiplier(PAPER_VIM_SCHEDULE, 50_000)
    parsed = TypeAdapter(LRSchedule).validate_python({"kind": "exponential", "decay_start": 90_000})
    assert isinstance(parsed, ExponentialSchedule) and parsed.decay_start == 90_000
    assert TypeAdapter(LRSchedule).validate_python({"kind": "cosine"}) == PAPER_TOKENIZER_SCHEDULE


def test_pipeline_defaults_are_the_paper_schedules_and_do_not_share_them():
    tok, vim = TokenizerSection(), TransformerSection()
    assert tok.train.schedule == PAPER_TOKENIZER_SCHEDULE and vim.train.schedule == PAPER_VIM_SCHEDULE
    assert (tok.train.steps, vim.train.steps) == (500_000, 450_000)
    tok.train.schedule.peak_lr = 3e-4  # a copy: the constant and the next default stay the paper's
    assert PAPER_TOKENIZER_SCHEDULE.peak_lr == 1e-4 and TokenizerSection().train.schedule.peak_lr == 1e-4


def test_no_warmup_starts_at_peak():
    s = CosineSchedule(peak_lr=1.0, final_lr=0.0, warmup_steps=0)
    assert (
        s.lr_at(0, 11) == 1.0
        and s.lr_at(5, 11) == pytest.approx(0.5)
        and s.lr_at(10, 11) == pytest.approx(0.0)
    )


# ---------------------------------------------------------------- loop pieces


def test_ema_math_and_copy():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3.0)
        net[1].running_mean.fill_(7.0)
    ema.update(net)
    assert torch.allclose(ema.params["0.weight"], torch.full((2, 2), 0.9 * 1 + 0.1 * 3))
    ema.update(net)
    expect = 0.9 * (0.9 + 0.3) + 0.1 * 3  # 1.38
    assert torch.allclose(ema.params["0.bias"], torch.full((2,), expect))
    assert torch.equal(ema.buffers["1.running_mean"], torch.full((2,), 7.0))  # copied, not averaged

    with ema.applied_to(net):
        assert torch.allclose(net[0].weight, torch.full((2, 2), expect))
    assert torch.equal(net[0].weight, torch.full((2, 2), 3.0))  # training weights back

    fresh = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    fresh.load_state_dict(ema.state_dict())  # same keys as the module
    assert torch.allclose(fresh[0].weight, torch.full((2, 2), expect))
    other = EMA(fresh, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.params["0.weight"], ema.params["0.weight"])
    with pytest.raises(RuntimeError, match="EMA state mismatch"):
        other.load_state_dict({"0.weight": torch.zeros(2, 2)})
    with pytest.raises(VimError):
        EMA(net, decay=1.0)


def test_check_finite_names_step_and_loss():
    check_finite({"l2": torch.tensor(0.3), "vq": 0.1}, step=3)
    with pytest.raises(VimError, match=r"^step 1234: non-finite loss vq=nan") as err:
        check_finite({"l2": torch.tensor(0.3), "vq": torch.tensor(float("nan"))}, step=1234)
    assert "l2" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VimError, match=r"step 7: non-finite loss adv=inf, l2=-inf"):
        check_finite({"adv": torch.tensor(float("inf")), "l2": float("-inf")}, step=7)


def test_clip_grad_returns_norm_before_clipping():
    w = nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    assert clip_grad([w], None).item() == pytest.approx(5.0)
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))  # measured only
    assert clip_grad([w], 1.0).item() == pytest.approx(5.0)
    assert w.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_autocast_flags():
    lin = nn.Linear(4, 4)
    with autocast_context("cpu", bf16=True):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), bf16=False):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_set_seed_reproduces_all_rngs():
    set_seed(123)
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_seed(123)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _epochs(seed: int, n: int = 10, batch: int = 3):
    """Epoch-seeded shuffles of n items in batches (last partial batch kept), like iter_batches(seed=seed+e)."""

    def make(epoch: int):
        order = np.random.default_rng(seed + epoch).permutation(n)
        return (order[i : i + batch].tolist() for i in range(0, n, batch))

    return make


@pytest.mark.parametrize("hint", [None, 4])
def test_resumable_batches_resume_sees_same_data(hint):
    make = _epochs(seed=7)
    epochs, full = zip(*islice(resumable_batches(make, 0), 15), strict=True)
    assert list(epochs) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3
    assert full[0] != full[4]  # each epoch reshuffles
    for start in (0, 3, 4, 9, 13):
        resumed = [b for _, b in islice(resumable_batches(make, start, hint), 15 - start)]
        assert resumed == list(full[start:]), start


def test_resumable_batches_empty_epoch_is_an_error():
    with pytest.raises(VimError, match="epoch 0 yielded no batches"):
        next(resumable_batches(lambda epoch: iter(()), 0))
