"""Toy training run for the resume and DDP tests: a tiny MLP on a fixed synthetic regression set.

It uses the real pieces (schedule, EMA, clipping, finiteness check, resumable data, checkpoints, tracker,
DDP helpers). Run directly or under torchrun. Not collected by pytest (no test_ prefix).
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vim_core.config.schedule import CosineSchedule
from vim_core.train import checkpoint as ckpt
from vim_core.train import distributed as vdist
from vim_core.train.loop import EMA, check_finite, clip_grad, resumable_batches, set_seed
from vim_core.train.schedule import make_scheduler
from vim_core.train.tracking import JsonlTracker, NullTracker

N_SAMPLES, N_IN, N_OUT = 96, 8, 2


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, N_IN, generator=g)
    w = torch.randn(N_IN, N_OUT, generator=g)
    return x, torch.tanh(x @ w)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True, help="final weights: <out>.rank<r>.safetensors")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=16, help="global batch, split evenly over ranks")
    p.add_argument("--resume", default="auto")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--noise", type=float, default=0.0, help="input noise from numpy's global RNG")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step, so a test can kill mid-run")
    p.add_argument("--die-in-save-at", type=int, default=-1, help="SIGKILL itself inside this step's save")
    args = p.parse_args()

    torch.set_num_threads(1)
    info = vdist.init_distributed("cpu")
    if args.batch % info.world_size:
        sys.exit("batch must divide by the world size")
    local = args.batch // info.world_size

    if args.die_in_save_at >= 0:
        real_replace = os.replace

        def replace(src, dst):
            # Die after every file is written, just before the checkpoint would get its final name.
            if Path(dst).name == ckpt.step_dir_name(args.die_in_save_at):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)

        ckpt.os.replace = replace

    set_seed(0)
    x_all, y_all = dataset()
    model = nn.Sequential(nn.Linear(N_IN, 32), nn.GELU(), nn.Dropout(args.dropout), nn.Linear(32, N_OUT))
    schedule = CosineSchedule(peak_lr=3e-2, final_lr=3e-3, warmup_steps=5)
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.peak_lr, betas=(0.9, 0.99), weight_decay=1e-4)
    sched = make_scheduler(opt, schedule, args.steps)
    ema = EMA(model, decay=0.9)
    net = vdist.wrap_ddp(model, info)

    modules = {"model": net, "ema": ema}  # the DDP wrapper on purpose: checkpoints must unwrap it
    start, extra = ckpt.maybe_resume(args.ckpt_dir, args.resume, modules, {"opt": opt}, {"sched": sched})
    if info.is_main:
        print(f"start {start} {extra}", flush=True)
    tracker = (
        JsonlTracker(args.log_dir, prefix="toy", start_step=start)
        if args.log_dir and info.is_main
        else NullTracker()
    )

    def epoch_batches(epoch: int):
        order = torch.from_numpy(np.random.default_rng(100 + epoch).permutation(N_SAMPLES))
        for i in range(0, N_SAMPLES - args.batch + 1, args.batch):
            idx = order[i : i + args.batch][info.rank * local : (info.rank + 1) * local]
            yield x_all[idx], y_all[idx]

    batches = resumable_batches(epoch_batches, start)
    for step in range(start, args.steps):
        epoch, (x, y) = next(batches)
        if args.noise:
            x = x + torch.from_numpy(np.random.normal(0.0, args.noise, size=x.shape).astype(np.float32))
        loss = F.mse_loss(net(x), y)
        check_finite({"mse": loss}, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = sched.get_last_lr()[0]  # the lr this step uses
        grad_norm = clip_grad(model, 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        mean_loss = vdist.all_reduce_mean(loss.detach())
        tracker.log_metrics({"loss/mse": mean_loss, "grad_norm": grad_norm, "lr": lr}, step)
        if info.is_main:
            print(f"step {step} loss {mean_loss.item():.10f}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)
        if (step + 1) % args.every == 0:
            ckpt.save_checkpoint(
                args.ckpt_dir, step + 1, modules, {"opt": opt}, {"sched": sched}, extra={"epoch": epoch}
            )

    # A module each rank initialises differently, then takes from rank 0: tests broadcast_module.
    torch.manual_seed(1000 + info.rank)
    probe = nn.Linear(3, 3)
    vdist.broadcast_module(probe)

    weights = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    weights |= {f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()}
    weights |= {f"probe.{k}": v.contiguous() for k, v in probe.state_dict().items()}
    save_file(weights, f"{args.out}.rank{info.rank}.safetensors")
    vdist.cleanup()
    if info.is_main:
        print("done", flush=True)


if __name__ == "__main__":
    main()
