"""Small pieces every trainer shares: EMA, finiteness check, clipping, AMP, seeding, resumable data."""

import contextlib
import math
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vim_core.errors import VimError
from vim_core.train import distributed as vdist


class EMA:
    """Exponential moving average of a module's parameters: shadow = decay * shadow + (1 - decay) * param.

    Buffers (e.g. norm statistics) are copied as they are, not averaged. The shadow lives on the
    parameters' device and in their dtype.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise VimError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        module = vdist.unwrap(module)
        self.params = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        module = vdist.unwrap(module)
        weight = 1.0 - self.decay
        for name, p in module.named_parameters():
            shadow = self.params[name]
            if shadow.is_floating_point():
                shadow.lerp_(p.detach().to(shadow.dtype), weight)
            else:
                shadow.copy_(p)
        for name, b in module.named_buffers():
            self.buffers[name].copy_(b)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the module's weights with the averaged ones."""
        module = vdist.unwrap(module)
        for name, p in module.named_parameters():
            p.copy_(self.params[name])
        for name, b in module.named_buffers():
            b.copy_(self.buffers[name])

    @contextlib.contextmanager
    def applied_to(self, module: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with EMA weights inside the block; the training weights come back afterwards."""
        plain = vdist.unwrap(module)
        saved = {k: v.detach().clone() for k, v in plain.state_dict().items()}
        self.copy_to(plain)
        try:
            yield module
        finally:
            plain.load_state_dict(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Same keys as the module's state_dict, so ema.safetensors loads straight into a fresh model."""
        return {**self.params, **self.buffers}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.params) | set(self.buffers)
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RuntimeError(f"EMA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, t in {**self.params, **self.buffers}.items():
            t.copy_(state[name])


def check_finite(losses: dict[str, torch.Tensor | float], step: int) -> None:
    """Stop the run at the first NaN/inf loss, naming the step and the loss; one device sync per call."""
    if not losses:
        return
    device = next((v.device for v in losses.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    # Stack on the losses' device and copy once: one sync per step, not one per loss.
    values = torch.stack(
        [torch.as_tensor(v, device=device).detach().float().reshape(()) for v in losses.values()]
    )
    values = values.cpu()
    if bool(torch.isfinite(values).all()):
        return
    bad = [
        f"{name}={float(v)}" for name, v in zip(losses, values.tolist(), strict=True) if not math.isfinite(v)
    ]
    raise VimError(
        f"step {step}: non-finite loss {', '.join(bad)}; lower the lr, check the data, or turn off bf16, "
        "then resume from the last checkpoint"
    )


def clip_grad(params: nn.Module | Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm before clipping, as a 0-dim tensor (no sync); max_norm None or <= 0 only measures."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    limit = max_norm if max_norm and max_norm > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(list(params), limit)


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of a native bf16 matmul


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run in hardware on `device`: a CUDA GPU that supports bf16, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere bf16 is emulated (12-20x slower than fp32 on a CPU without AVX-512)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(f in cpu_flags() for f in NATIVE_BF16_CPU_FLAGS)


def uses_bf16(device: torch.device | str, bf16: bool | str) -> bool:
    """The train.bf16 setting resolved: true, false, or auto (on exactly where bf16 is native)."""
    return native_bf16(device) if bf16 == "auto" else bool(bf16)


def autocast_context(device: torch.device | str, bf16: bool | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when asked (or, for "auto", when native); bf16 needs no loss scaler."""
    if not uses_bf16(device, bf16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def maybe_compile(module: nn.Module, flag: bool) -> nn.Module:
    """torch.compile when asked; checkpoint.py and EMA unwrap `_orig_mod`, so state dict keys stay plain.

    Under DDP compile the DDP wrapper (compile(DDP(model))), so dynamo splits graphs at DDP's bucket
    boundaries and gradient all-reduce overlaps the backward.
    """
    return torch.compile(module) if flag else module


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def enable_tf32(device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (free speed on Ampere and later); a no-op on CPU."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high")  # also sets torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True


def resumable_batches(
    make_epoch_iter: Callable[[int], Iterable],
    start_step: int = 0,
    batches_per_epoch: int | None = None,
) -> Iterator[tuple[int, object]]:
    """Endless (epoch, batch) stream that skips the first `start_step` batches of the run.

    make_epoch_iter(epoch) must be a pure function of the epoch (seed its shuffle with seed + epoch), so a
    resumed run sees exactly the batches an uninterrupted one would. Skipping reads and discards batches;
    pass the exact `batches_per_epoch` to jump over whole epochs without reading them.
    """
    epoch, skip = 0, start_step
    if batches_per_epoch:
        epoch, skip = divmod(start_step, batches_per_epoch)
    while True:
        n = 0
        for batch in make_epoch_iter(epoch):
            n += 1
            if skip:
                skip -= 1
                continue
            yield epoch, batch
        if n == 0:
            raise VimError(
                f"epoch {epoch} yielded no batches; the dataset is empty or smaller than one batch"
            )
        epoch += 1


def progress(
    iterable: Iterable | None = None, total: int | None = None, initial: int = 0, desc: str = ""
) -> tqdm:
    """tqdm bar on rank 0 when stderr is a terminal; silent in logs, CI and other ranks."""
    enabled = vdist.is_main() and sys.stderr.isatty()
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)
