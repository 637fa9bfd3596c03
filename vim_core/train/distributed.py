"""torchrun / DDP helpers that turn into no-ops in a plain single-process run."""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vim_core.errors import VimError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise VimError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK; no-op outside torchrun.

    nccl on CUDA, gloo on CPU. `device` is "auto", "cpu" or "cuda"; with CUDA each rank takes cuda:LOCAL_RANK.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise VimError(f"device must be auto, cpu or cuda, got {device!r}")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise VimError("device=cuda was requested but torch sees no CUDA device; use device=cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev)
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise VimError("WORLD_SIZE>1 but MASTER_ADDR/MASTER_PORT are unset; launch with torchrun")
    if not dist.is_initialized():
        # device_id binds NCCL to this rank's GPU up front, so barrier() knows which device to use.
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank, world_size, local_rank, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, as a new tensor; the input is left alone."""
    if not is_dist():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_mean_dict(values: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """Mean over ranks of every scalar in `values`, in one collective; every rank must call it."""
    if not values:
        return {}
    tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    stacked = torch.stack(
        [torch.as_tensor(v, device=device).detach().float().reshape(()) for v in values.values()]
    )
    return dict(zip(values, all_reduce_mean(stacked).unbind(), strict=True))


@torch.no_grad()
def all_reduce_grads(module: nn.Module) -> None:
    """Average gradients over ranks in place, as DDP would, for a module kept outside DDP.

    The tokenizer's discriminator uses this: it runs with frozen weights in the generator step and
    through a double backward (R1), which DDP's reducer does not support. One flat all-reduce; every rank
    must have run the same code path, so the same parameters hold gradients everywhere.
    """
    if not is_dist():
        return
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p))


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (pickled; small things only)."""
    if not is_dist():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank `src` to every rank, e.g. for an EMA or a module outside DDP."""
    if not is_dist():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def wrap_ddp(module: nn.Module, info: DistInfo, **kwargs) -> nn.Module:
    """DDP-wrap for a multi-process run; the module itself otherwise."""
    if not info.distributed:
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
