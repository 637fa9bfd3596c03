"""What machine a benchmark ran on, for its JSON: the CPU, its cores, and the flags that decide speed here.

The CPU kind varies between sessions: with AVX-512 BF16 a bf16 matmul runs about 2.4x fp32, without
AVX-512 bf16 is emulated and 12-20x slower. Every figure says which kind it came from.
"""

import os
from pathlib import Path


def cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    for line in cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return os.uname().machine


def flags() -> set[str]:
    for line in cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_flag(flag: str) -> bool:
    return flag in flags()


def machine() -> dict:
    """The host as a JSON-able dict: CPU, usable cores, and its AVX-512 flags (empty without AVX-512)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_name(),
        "cores": cores,
        "avx512_bf16": has_flag("avx512_bf16"),
        "avx512_flags": sorted(f for f in flags() if f.startswith("avx512")),
    }
