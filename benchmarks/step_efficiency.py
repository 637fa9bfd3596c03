"""How close the trainers come to this CPU's arithmetic limit; prints one JSON object.

    python -m benchmarks.step_efficiency [--params params.yaml] [--steps 24] [--levers] [--out FILE]

In one process it measures:
- the matmul peak: a 2048x2048 matmul in fp32 and in bf16, GFLOP/s (median of 10 after warm-up);
- each trainer of the params file (tokenizer, VIM) in fp32 and in bf16 autocast: the real trainer
  (`train_tokenizer`, `train_transformer`) runs a few steps on the prepared data, and the step time is the
  median wall time of its steps (batch read included; the trainer records each step, see
  `vim_core.train.run.run_steps`). FLOPs per step are the trainer's own FlopCounterMode count on a real
  step. The tokenizer's step changes cost when the GAN starts, so it runs half its steps in each phase,
  and its step time and FLOPs are weighted by the phases' shares of the params file's own run.
  `ratio` = achieved FLOP/s over the same dtype's matmul peak; `bf16_speedup` = fp32 step / bf16 step.
- `top_ops`: where the slowest trainer's steps spend their time (torch.profiler, self CPU time of the ops
  inside the trainer's `train_step` ranges, fastest dtype).
- with --levers, what else could buy speed, each measured on the same trainers: torch.compile, threads,
  the SDPA kernel, batch size, the data loader alone, and the evaluate stage's own cost (from
  metrics/eval.json when a pipeline run left one).

Data: the params file's prepared data and tokens when `dvc repro` made them; otherwise the embedded data
is prepared into a temporary directory and tokenized with an untrained tokenizer (step times do not depend
on which tokens they are).
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks import host
from vim_core.config import Params, apply_overrides, load_params
from vim_core.data.prepare import prepare
from vim_core.data.shards import read_manifest
from vim_core.errors import ConfigError, VimError
from vim_core.io import atomic_write_text
from vim_core.timing import time_calls
from vim_core.tokenizer.encode_dataset import tokenize_dataset
from vim_core.tokenizer.export import save_tokenizer
from vim_core.tokenizer.model import build_tokenizer
from vim_core.train import run
from vim_core.train.run import STEP_RANGE
from vim_core.train.tokenizer_trainer import train_tokenizer
from vim_core.train.transformer_trainer import train_transformer

MATMUL_N = 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_EMULATED_STEPS = 2  # one per tokenizer phase: an emulated bf16 step takes about a minute


def matmul_gflops(dtype: torch.dtype, n: int = MATMUL_N, repeats: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    once = time_calls(lambda: a @ b, torch.device("cpu"), 1, warmup=0)[0]
    if once > 2.0:  # emulated bf16 (no AVX512_BF16/AMX): a minute per call, so one call is the figure
        return 2 * n**3 / once / 1e9
    seconds = statistics.median(time_calls(lambda: a @ b, torch.device("cpu"), repeats, warmup=2))
    return 2 * n**3 / seconds / 1e9


# ---- data


def ensure_data(params: Params, tmp: Path) -> tuple[str, str]:
    """(prepared data root, tokens dir): the pipeline's own when present, else made in `tmp`."""
    data_root = params.data.out_dir
    try:
        read_manifest(data_root)
    except VimError:
        data_root = str(tmp / "prepared")
        prepare(params.data.model_copy(update={"out_dir": data_root}))
    tokens_dir = params.transformer.tokens_dir
    try:
        manifest = read_manifest(tokens_dir)
        tok_manifest = read_manifest(data_root)
        if manifest["image_size"] != tok_manifest["image_size"]:
            raise VimError("tokens of other images")
    except (VimError, KeyError):
        source = read_manifest(data_root)
        model = build_tokenizer(params.tokenizer.model, source["image_size"], source["channels"]).eval()
        path = str(tmp / "untrained-tokenizer.safetensors")
        save_tokenizer(model, params.tokenizer.model, path)
        tokens_dir = str(tmp / "tokens")
        tokenize_dataset(path, data_root, tokens_dir)
    return data_root, tokens_dir


# ---- one short real training run


def short_train(train, steps: int, **update):
    """The section's train config for a few-step run: one warm-up step, decay (if any) from the middle,
    no resume, no checkpoints, plus `update` (bf16, compile, threads, batch_size)."""
    d = train.model_dump()
    d["schedule"]["warmup_steps"] = 1
    if "decay_start" in d["schedule"]:
        d["schedule"]["decay_start"] = steps // 2
    d.update(steps=steps, flops=None, resume="never", checkpoint_every=10**9, **update)
    return type(train).model_validate(d)


def tokenizer_step(params: Params, data_root: str, tmp: Path, steps: int, **train) -> dict:
    """Median step seconds and FLOPs per step of the real tokenizer trainer, weighted over the phases
    (before/after the GAN starts) as the params file's own run spends its steps."""
    cfg = params.tokenizer.model_copy(deep=True)
    own_steps = cfg.train.steps or 1
    gan_from = cfg.loss.adversarial_start_step if cfg.loss.adversarial_weight > 0 else None
    half = steps // 2
    cfg.train = short_train(cfg.train, steps, **train)
    if gan_from is not None:
        cfg.loss.adversarial_start_step = half
    tag = f"tok-{len(list(tmp.glob('tok-*')))}"
    cfg.out_dir, cfg.checkpoint_dir = str(tmp / tag / "out"), str(tmp / tag / "ckpt")
    m = train_tokenizer(cfg, data_root, seed=params.seed).metrics
    times = m["step_seconds_median"]
    phases = m.get("flops_per_step_phases") or [{"from_step": 0, "flops_per_step": m["flops_per_step"]}]
    if isinstance(times, float):
        times = [{"from_step": 0, "seconds": times}]
    if gan_from is None or len(times) == 1:
        weights = [1.0]
    else:
        plain = min(gan_from, own_steps) / own_steps
        weights = [plain, 1.0 - plain]
    step_s = sum(w * t["seconds"] for w, t in zip(weights, times, strict=True))
    flops = sum(w * p["flops_per_step"] for w, p in zip(weights, phases, strict=True))
    return {
        "step_s": round(step_s, 4),
        "flops_per_step": flops,
        "phases": [
            {
                "phase": name,
                "share": round(w, 3),
                "step_s": t["seconds"],
                "flops_per_step": p["flops_per_step"],
            }
            for name, w, t, p in zip(("no GAN", "GAN"), weights, times, phases, strict=False)
        ],
        "first_step_s": m["first_step_seconds"],
    }


def transformer_step(params: Params, tokens_dir: str, tmp: Path, steps: int, **train) -> dict:
    cfg = params.transformer.model_copy(deep=True)
    cfg.train = short_train(cfg.train, steps, **train)
    tag = f"vim-{len(list(tmp.glob('vim-*')))}"
    cfg.tokens_dir = tokens_dir
    cfg.out_dir, cfg.checkpoint_dir = str(tmp / tag / "out"), str(tmp / tag / "ckpt")
    m = train_transformer(cfg, seed=params.seed).metrics
    return {
        "step_s": m["step_seconds_median"],
        "flops_per_step": m["flops_per_step"],
        "first_step_s": m["first_step_seconds"],
    }


def efficiency(result: dict, peak_gflops: float) -> dict:
    gflops = result["flops_per_step"] / result["step_s"] / 1e9
    return {**result, "gflops": round(gflops, 2), "ratio": round(gflops / peak_gflops, 3)}


# ---- where the time goes


def top_ops(fn, n: int = 12) -> list[dict]:
    """Self CPU time of the ops inside `train_step` ranges while fn runs, per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    steps = [e for e in events if e.name == STEP_RANGE]
    inside: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        parent = e.cpu_parent
        while parent is not None and parent.name != STEP_RANGE:
            parent = parent.cpu_parent
        if parent is None or e.name == STEP_RANGE:
            continue
        inside[e.name][0] += e.self_cpu_time_total
        inside[e.name][1] += 1
    total = sum(v[0] for v in inside.values()) or 1.0
    ranked = sorted(inside.items(), key=lambda kv: -kv[1][0])[:n]
    per_step = max(len(steps), 1)
    return [
        {
            "op": name,
            "self_ms_per_step": round(us / 1e3 / per_step, 2),
            "share": round(us / total, 3),
            "calls_per_step": round(calls / per_step, 1),
        }
        for name, (us, calls) in ranked
    ]


# ---- levers


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def data_loading_ms(root: str, batch_size: int, batches: int = 50) -> float:
    """Milliseconds to read one training batch, the loader alone (no model)."""
    ctx = run.RunContext(
        run.vdist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")), batch_size
    )
    n_train = read_manifest(root)["splits"]["train"]["count"]
    stream = run.train_batches(ctx, root, batch_size, n_train, seed=0, start=0)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return round((time.perf_counter() - start) / batches * 1e3, 3)


def levers(params: Params, data_root: str, tokens_dir: str, tmp: Path, steps: int, best: dict) -> dict:
    """Each lever against the trainer's better dtype at today's settings (`best`)."""
    out: dict = {}
    trainers = {
        "tokenizer": lambda **kw: tokenizer_step(params, data_root, tmp, steps, **kw),
        "transformer": lambda **kw: transformer_step(params, tokens_dir, tmp, steps, **kw),
    }
    for name, step in trainers.items():
        bf16 = best[name] == "bf16"
        base = step(bf16=bf16)
        rows = {"baseline": base}
        rows["compile"] = step(bf16=bf16, compile=True)
        with threads(1):
            rows["threads_1"] = step(bf16=bf16, threads=1)
        section = params.tokenizer if name == "tokenizer" else params.transformer
        batch = section.train.batch_size
        rows[f"batch_{2 * batch}"] = step(bf16=bf16, batch_size=2 * batch)
        if name == "transformer":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                rows["sdpa_math"] = step(bf16=bf16)
        for key, row in rows.items():
            per_example = row["step_s"] / (2 * batch if key.startswith("batch_") else batch)
            row["ms_per_example"] = round(per_example * 1e3, 3)
            if key != "baseline":  # per example, so a larger batch compares fairly
                row["speedup"] = round(base["step_s"] / batch / per_example, 3)
        out[name] = rows
    out["data_loading_ms_per_batch"] = {
        "tokenizer": data_loading_ms(data_root, params.tokenizer.train.batch_size),
        "transformer": data_loading_ms(tokens_dir, params.transformer.train.batch_size),
    }
    eval_json = Path("metrics/eval.json")
    if eval_json.exists():
        out["evaluate_seconds"] = {
            "source": f"{eval_json} (the last pipeline run's evaluate stage)",
            **json.loads(eval_json.read_text()).get("timings_seconds", {}),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--steps", type=int, default=24, help="steps per trainer run (>= 14)")
    parser.add_argument("--levers", action="store_true", help="also measure compile, threads, SDPA, batch")
    parser.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = parser.parse_args(argv)
    if args.steps < 14:
        parser.error("--steps must be at least 14 (the median skips each phase's first 3 steps)")
    try:
        params = apply_overrides(load_params(args.params), args.set)
    except (ConfigError, VimError) as err:
        print(f"step_efficiency: {err}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_root, tokens_dir = ensure_data(params, tmp)
        peaks = {name: round(matmul_gflops(dtype), 1) for name, dtype in DTYPES.items()}
        trainers: dict = {}
        runs = {
            "tokenizer": lambda bf16, n: tokenizer_step(params, data_root, tmp, n, bf16=bf16),
            "transformer": lambda bf16, n: transformer_step(params, tokens_dir, tmp, n, bf16=bf16),
        }
        # Without native bf16 (no AVX512_BF16/AMX) torch emulates it, tens of times slower than fp32:
        # a full-length bf16 run would take most of an hour, so it gets a few steps only.
        native_bf16 = peaks["bf16"] >= 0.5 * peaks["fp32"]
        bf16_steps = args.steps if native_bf16 else BF16_EMULATED_STEPS
        for name, fn in runs.items():
            row = {"fp32": efficiency(fn(False, args.steps), peaks["fp32"])}
            row["bf16"] = efficiency(fn(True, bf16_steps), peaks["bf16"])
            if not native_bf16:
                row["bf16"]["note"] = f"{bf16_steps} steps only: this CPU has no native bf16 matmul"
            row["bf16_speedup"] = round(row["fp32"]["step_s"] / row["bf16"]["step_s"], 3)
            trainers[name] = row
        best = {name: min(DTYPES, key=lambda dt, r=row: r[dt]["step_s"]) for name, row in trainers.items()}
        own_steps = {"tokenizer": params.tokenizer.train.steps, "transformer": params.transformer.train.steps}
        slowest = max(trainers, key=lambda n: trainers[n][best[n]]["step_s"] * (own_steps[n] or 1))
        profile_steps = max(8, args.steps // 2)

        def profile_of(name: str) -> list[dict]:
            return top_ops(lambda: runs[name](best[name] == "bf16", profile_steps))

        ops = profile_of(slowest)
        # and the profile of any trainer below half its dtype's peak, to say what holds it back
        below = {n: profile_of(n) for n, r in trainers.items() if n != slowest and r[best[n]]["ratio"] < 0.5}
        result = {
            "machine": {
                "cpu": host.cpu_name(),
                "avx512_bf16": host.has_flag("avx512_bf16"),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "matmul_gflops": peaks,
            "matmul_shape": f"{MATMUL_N}x{MATMUL_N} @ {MATMUL_N}x{MATMUL_N}",
            "trainers": trainers,
            "best_dtype": best,
            "top_ops_trainer": f"{slowest} ({best[slowest]})",
            "top_ops": ops,
            "top_ops_below_half_peak": below,
        }
        if args.levers:
            result["levers"] = levers(params, data_root, tokens_dir, tmp, args.steps, best)
        result["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
