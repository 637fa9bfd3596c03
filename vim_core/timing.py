"""Wall-clock timing of a callable, the one way benchmarks and throughput metrics measure speed."""

import time
from collections.abc import Callable

import torch


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` uncounted ones (compilation, caches);
    on CUDA each call is bracketed by a synchronize, so the time is the kernels', not the launch's."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times
