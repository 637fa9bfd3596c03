"""The GPU acceptance check, one command under 8 minutes on an H100/H200; prints one JSON object.

    bash benchmarks/gpu_acceptance.sh [--out DIR] [--smoke] [--budget-s 450]

Three parts, in this order, each under a time limit and all inside --budget-s. A part that fails or runs
out of time is recorded with its error, the others still run, and the exit status is 1 at the end.
- throughput: benchmarks/gpu_throughput.bench at paper shapes (SS tokenizer at 256 px with 1024 tokens
  and 8192 codes, VIM-Base at 1024 tokens), bf16 and torch.compile: images/s, tokens/s, MFU, peak memory.
- sampling: KV-cache sampling of VIM-Base at 1024 tokens, with fp32 weights (as evaluate samples) and
  with bf16 weights: tokens/s, images/s, peak memory.
- torchrun: the real trainers as docs/scaling.md runs them on GPUs, `torchrun -m vim_core.cli train-tokenizer`,
  then `pretrain-transformer` on the tokens of the tokenizer it trained; 2 ranks with 2 or more GPUs
  (nccl), else 1. The pipeline's params.yaml, cut to a few steps on a slice of the embedded MNIST, with
  bf16 and compile on. rc, wall time and world size of each launch; their logs go to DIR. It runs last
  and gets what is left of the budget (at least 165 s), since its compile times are the least known.
The JSON also goes to DIR/gpu_acceptance.json (default benchmarks/out), written atomically.
--smoke runs all three with tiny models on the CPU (torchrun on gloo with 2 ranks, the tokenizer stage
only: each launch costs about 17 CPU-seconds of imports), so the script keeps working without a GPU; its
numbers mean nothing. Without --smoke and without CUDA it exits 2.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.gpu_throughput import (
    Settings,
    bench,
    device_name,
    peak_memory_gib,
    peak_tflops,
    reset_peak_memory,
)
from benchmarks.sampling import cache_throughput
from vim_core.config import parse_params, read_params_file
from vim_core.config.transformer import resolve_model
from vim_core.data.prepare import prepare
from vim_core.io import atomic_write_text
from vim_core.tokenizer.encode_dataset import tokenize_dataset
from vim_core.transformer import VIM

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_acceptance")

# Seconds per part on an H100/H200, not measured yet (no GPU so far): the budget of 450 s plus the
# interpreter's start-up stays under 8 minutes; torchrun, last, gets the rest of it (None).
BUDGET_S = 450.0
LIMITS_S = {"throughput": 210, "sampling": 75, "torchrun": None}
SMOKE_LIMIT_S = 300  # per part: a busy 2-core CPU can be slow, and nothing is scarce there
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STAGES = (("tokenizer", "train-tokenizer"), ("transformer", "pretrain-transformer"))


class PartTimeout(BaseException):
    """A part past its time limit. A BaseException, like KeyboardInterrupt, so that an `except Exception`
    in whatever library code the alarm interrupts does not swallow it."""


class PartFailed(Exception):
    """A part that failed; `result`, what it had measured by then, still goes into the JSON."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


@contextlib.contextmanager
def keeping(result: dict, what: str):
    """Any error inside (a timeout too) becomes a PartFailed that carries `result` as it stands."""
    try:
        yield
    except PartFailed:
        raise
    except (Exception, PartTimeout) as err:
        if isinstance(err, PartTimeout):
            signal.setitimer(signal.ITIMER_REAL, 0)  # the part is over: no repeat may land in what follows
        raise PartFailed(f"{what}: {type(err).__name__}: {err}", result) from err


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in the main thread after `seconds` (SIGALRM; it also interrupts waits)."""

    def expire(signum, frame):
        raise PartTimeout(f"ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    # then again every 0.1 s until the block ends: a raise that lands in a weakref callback or a __del__
    # is printed and dropped by Python (seen under a full test run), and the next one ends the part; a
    # longer interval let a dropped alarm's part finish and the next part take the timeout (CI, stop 31)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------------
# Part 1: training throughput at paper shapes.


def throughput_part(smoke: bool, peak: float | None, out: Path) -> dict:
    settings = Settings(steps=2 if smoke else 5, warmup=1 if smoke else 2, peak_tflops=peak, smoke=smoke)
    result: dict = {}
    for model in ("tokenizer", "transformer"):
        with keeping(result, model):
            result |= bench(settings, only=model)
    return result


# ---------------------------------------------------------------------------------------------------------
# Part 2: KV-cache sampling at 1024 tokens.


def sampling_part(smoke: bool, peak: float | None, out: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset, vocab, grid, n = ("tiny", 64, 8, 4) if smoke else ("vim-base", 8192, 32, 32)
    torch.manual_seed(0)
    model = VIM(resolve_model(preset), vocab, grid).to(device).eval()
    result: dict = {
        "preset": "smoke (tiny, 8x8 tokens)" if smoke else "vim-base, 32x32 tokens, 8192 codes",
        "params": model.num_params(),
        "cfg_scale": 1.0,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    for dtype in (torch.float32, torch.bfloat16):  # sample() runs under inference_mode itself
        with keeping(result, str(dtype)):
            model.to(dtype)
            reset_peak_memory(device)
            row = cache_throughput(model, n)
            result[row["dtype"]] = row | {"peak_memory_gib": peak_memory_gib(device)}
    return result


# ---------------------------------------------------------------------------------------------------------
# Part 3: the real trainers under torchrun.


def gpu_params(work: Path) -> dict:
    """The pipeline's params.yaml, cut to 20 steps with bf16 and compile, every path under `work`."""
    raw = read_params_file(REPO / "params.yaml")
    short = {"steps": 20, "bf16": True, "compile": True, "device": "cuda", "checkpoint_every": 20}
    raw["data"] |= {"out_dir": str(work / "prepared"), "max_images": 1200}
    tok, vim = raw["tokenizer"], raw["transformer"]
    tok["train"] |= short | {"schedule": tok["train"]["schedule"] | {"warmup_steps": 2}, "log_every": 5}
    tok["loss"] |= {"adversarial_start_step": 10, "r1_every": 8}  # the GAN phase and R1 within 20 steps
    tok["eval"] = {"usage_batch_size": 64, "max_test_images": 128, "grid_images": 16}
    vim["train"] |= short | {"log_every": 5}
    vim["train"]["schedule"] |= {"warmup_steps": 2, "decay_start": 10}
    _move_outputs(raw, work)
    return raw


def smoke_params(work: Path) -> dict:
    """Micro models on the CPU, as tests/vim_core/train/test_ddp_trainers.py trains them: a few seconds a launch."""
    micro = {"blocks": 1, "heads": 2, "dim": 32, "mlp_dim": 64}
    train = {
        "steps": 4,
        "batch_size": 8,
        "checkpoint_every": 4,
        "threads": 1,
        "log_every": 1,
        "device": "cpu",
    }
    schedule = {"kind": "cosine", "peak_lr": 1e-3, "final_lr": 1e-4, "warmup_steps": 1}
    raw = {
        "seed": 0,
        "data": {"out_dir": str(work / "prepared"), "max_images": 100, "shard_size": 64},
        "tokenizer": {
            "model": {"encoder": micro, "decoder": micro, "codebook_size": 64, "code_dim": 8},
            "loss": {
                "adversarial_weight": 0.1,
                "adversarial_start_step": 2,
                "discriminator": {"width": 8, "max_width": 16},
                "r1_every": 2,
            },
            "train": train | {"schedule": schedule},
            "eval": {"max_test_images": 8, "usage_batch_size": 8, "grid_images": 4},
        },
        "transformer": {
            "model": {"layers": 1, "heads": 2, "dim": 32, "mlp_dim": 64, "num_classes": 10, "dropout": 0.0},
            "train": train | {"schedule": schedule},
        },
    }
    _move_outputs(raw, work)
    return raw


def _move_outputs(raw: dict, work: Path) -> None:
    raw["tokenizer"] |= {"out_dir": str(work / "tokenizer"), "checkpoint_dir": str(work / "tok_ckpt")}
    raw["transformer"] |= {
        "tokens_dir": str(work / "tokens"),
        "out_dir": str(work / "transformer"),
        "checkpoint_dir": str(work / "vim_ckpt"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: str, ranks: int, work: Path, log_path: Path) -> tuple[int, float]:
    """One torchrun launch of `vim_core.cli command`; (exit status, seconds). Output goes to log_path.

    On a timeout (PartTimeout out of the wait) torchrun gets SIGTERM, which it passes on to its ranks.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "vim_core.cli", command, "--params", str(work / "params.json"),
           "--plots", str(work / "plots"), "--metrics", str(work / f"{command}.json")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return rc, time.monotonic() - started


def _reason(log_path: Path) -> str:
    """A failed launch's cause: the CLI's `error: ...` line, else a rank's last exception line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    errors = errors or [  # torchrun's own ChildFailedError only says that a rank failed
        line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line) and "ChildFailed" not in line
    ]
    return ((errors or lines or ["(no output)"])[-1])[:300]


def torchrun_part(smoke: bool, peak: float | None, out: Path) -> dict:
    gpus = torch.cuda.device_count() if not smoke else 0
    ranks = 2 if smoke or gpus >= 2 else 1
    backend = ("gloo" if smoke else "nccl") if ranks > 1 else None  # one rank joins no process group
    result: dict = {"ranks": ranks, "backend": backend, "rc": None, "wall_s": None, "stages": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="torchrun-", dir=out, ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        raw = smoke_params(work) if smoke else gpu_params(work)
        (work / "params.json").write_text(json.dumps(raw, indent=1))
        params = parse_params(raw)
        with keeping(result, "prepare_data"):
            prepare(params.data)
        for stage, command in STAGES[:1] if smoke else STAGES:
            log_path = out / f"torchrun-{stage}.log"
            entry: dict = {"rc": None, "wall_s": None, "log": str(log_path)}  # rc None: it never ended
            result["stages"][stage] = entry
            with keeping(result, stage):
                if stage == "transformer":  # as the tokenize_dataset stage does it (on the CPU)
                    tokenizer = Path(params.tokenizer.out_dir) / "tokenizer.safetensors"
                    tokenize_dataset(str(tokenizer), params.data.out_dir, params.transformer.tokens_dir)
                log.info("torchrun %s: %d rank(s), log in %s", command, ranks, log_path)
                rc, seconds = launch(command, ranks, work, log_path)
                entry |= {"rc": rc, "wall_s": round(seconds, 2)}
                result |= {"rc": rc, "wall_s": round(time.monotonic() - started, 2)}
                if rc != 0:
                    raise PartFailed(f"{command} exited {rc}: {_reason(log_path)}", result)
                metrics = json.loads((work / f"{command}.json").read_text())
                entry |= {k: metrics.get(k) for k in ("world_size", "steps", "train_seconds")}
    return result


# ---------------------------------------------------------------------------------------------------------


PARTS: dict[str, Callable[[bool, float | None, Path], dict]] = {
    "throughput": throughput_part,
    "sampling": sampling_part,
    "torchrun": torchrun_part,
}


def run_part(name: str, smoke: bool, peak: float | None, out: Path, limit_s: float) -> dict:
    """{ok, seconds, limit_s, error, result}; a failure is caught and recorded, never raised."""
    entry: dict = {"ok": False, "seconds": 0.0, "limit_s": round(limit_s, 1), "error": None, "result": None}
    if limit_s < 5:
        entry["error"] = "skipped: the --budget-s was spent by the parts before"
        return entry
    log.info("%s: starting (limit %.0f s)", name, limit_s)
    reset_peak_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # and free the cache
    started = time.monotonic()
    try:
        with time_limit(limit_s):
            entry["result"] = PARTS[name](smoke, peak, out)
        entry["ok"] = True
    except (Exception, PartTimeout) as err:  # one part's failure must not stop the others
        log.exception("%s failed", name)
        message = str(err) if isinstance(err, PartFailed) else f"{type(err).__name__}: {err}"
        entry["error"] = (message.splitlines() or [""])[0][:500]
        entry["result"] = getattr(err, "result", None)
    entry["seconds"] = round(time.monotonic() - started, 2)
    log.info("%s: %s in %.1f s", name, "ok" if entry["ok"] else "FAILED", entry["seconds"])
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out", help="where the JSON goes")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, to test the script")
    parser.add_argument("--budget-s", type=float, default=None, help=f"all parts together ({BUDGET_S:.0f})")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s: %(message)s")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_acceptance: torch sees no CUDA device; run it on a GPU, or pass --smoke", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)  # tiny models gain nothing from more, and a shared CPU loses a lot
    started = time.monotonic()
    budget = args.budget_s or (3 * SMOKE_LIMIT_S if args.smoke else BUDGET_S)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    peak = peak_tflops(name) if device.type == "cuda" else None
    report: dict = {
        "benchmark": "gpu_acceptance",
        "smoke": args.smoke,
        "ok": False,
        "device": name,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_bf16_tflops": peak,
        "budget_s": budget,
        "parts": {},
    }
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        for part in PARTS:
            left = budget - (time.monotonic() - started)
            limit = min(SMOKE_LIMIT_S if args.smoke else LIMITS_S[part] or left, left)
            report["parts"][part] = run_part(part, args.smoke, peak, args.out, limit)
    report["ok"] = all(p["ok"] for p in report["parts"].values())
    report["failed"] = [k for k, p in report["parts"].items() if not p["ok"]]
    report["total_seconds"] = round(time.monotonic() - started, 2)
    text = json.dumps(report, indent=2)
    atomic_write_text(args.out / "gpu_acceptance.json", text + "\n")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
