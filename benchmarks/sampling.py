"""KV-cache sampling vs. full recompute, at 64 and 256 tokens per image; prints JSON.

    python benchmarks/sampling.py [--preset tiny] [--n 8] [--repeats 2] [--threads 0] [--seed 0]
                                  [--batch-sizes 64,128,256 --batch-n 512 --cfg 1.5]

The same weights sample with and without the cache under the same seed; the tokens must match.
With --batch-sizes it also times guided KV-cache sampling of --batch-n images at 8x8 tokens per
batch size, the way the evaluate stage samples (transformer.sampling.batch_size).
cache_throughput() times the cached path alone on any device (benchmarks/gpu_acceptance.py uses it).
"""

import argparse
import json
import platform
import time

import torch

from vim_core.config.transformer import resolve_model
from vim_core.transformer import VIM, sample


def timed_sample(model: VIM, n: int, labels: torch.Tensor | None, seed: int, use_cache: bool, repeats: int):
    """Best of `repeats` wall times: the least disturbed by other work on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = sample(model, n, labels, seed=seed, use_cache=use_cache)
        if tokens.is_cuda:  # sampling only queues kernels; wait for them
            torch.cuda.synchronize(tokens.device)
        best = min(best, time.perf_counter() - start)
    return tokens, best


def cache_throughput(model: VIM, n: int, seed: int = 0) -> dict:
    """KV-cache sampling of n images at the model's full grid, on its device, after a 2-image warm-up."""
    labels = torch.arange(n) % model.num_classes if model.num_classes else None
    timed_sample(model, 2, labels[:2] if labels is not None else None, seed, True, 1)
    _, seconds = timed_sample(model, n, labels, seed, use_cache=True, repeats=1)
    return {
        "tokens_per_image": model.seq_len,
        "images": n,
        "dtype": str(model.head.weight.dtype).removeprefix("torch."),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(n * model.seq_len / seconds, 1),
        "images_per_s": round(n / seconds, 2),
    }


def bench_grid(preset: str, side: int, vocab: int, n: int, seed: int, repeats: int) -> dict:
    cfg = resolve_model(preset)
    torch.manual_seed(seed)
    model = VIM(cfg, vocab, side).eval()
    labels = torch.arange(n) % cfg.num_classes if cfg.num_classes else None
    timed_sample(model, 2, labels[:2] if labels is not None else None, seed, True, 1)  # warm-up
    cached, t_cache = timed_sample(model, n, labels, seed, use_cache=True, repeats=repeats)
    full, t_full = timed_sample(model, n, labels, seed, use_cache=False, repeats=repeats)
    tokens = n * model.seq_len
    return {
        "tokens_per_image": model.seq_len,
        "images": n,
        "repeats": repeats,
        "cache_tokens_per_s": round(tokens / t_cache, 1),
        "recompute_tokens_per_s": round(tokens / t_full, 1),
        "cache_seconds": round(t_cache, 3),
        "recompute_seconds": round(t_full, 3),
        "speedup": round(t_full / t_cache, 2),
        "identical_tokens": bool(torch.equal(cached, full)),
    }


def batch_sweep(
    preset: str, vocab: int, n: int, batch_sizes: list[int], cfg_scale: float, seed: int, repeats: int
) -> dict:
    """Images/s of guided KV-cache sampling at 8x8 tokens for each batch size (guidance doubles the rows)."""
    cfg = resolve_model(preset)
    torch.manual_seed(seed)
    model = VIM(cfg, vocab, 8).eval()
    labels = torch.arange(n) % cfg.num_classes if cfg.num_classes else None
    scale = cfg_scale if cfg.num_classes else 1.0
    sample(model, 2, labels[:2] if labels is not None else None, seed=seed, cfg_scale=scale)  # warm-up
    out = {}
    for batch in batch_sizes:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            sample(model, n, labels, seed=seed, cfg_scale=scale, batch_size=batch)
            best = min(best, time.perf_counter() - start)
        out[str(batch)] = {"seconds": round(best, 3), "images_per_s": round(n / best, 1)}
    base = out[str(batch_sizes[0])]["seconds"]
    for row in out.values():
        row["speedup"] = round(base / row["seconds"], 2)
    return {"images": n, "cfg_scale": scale, "repeats": repeats, "by_batch_size": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--n", type=int, default=8, help="images per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path; the best is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated sampling batch sizes to time")
    parser.add_argument("--batch-n", type=int, default=512, help="images per batch-size run")
    parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale of the batch-size runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        results = {
            f"{s}x{s}": bench_grid(args.preset, s, args.vocab, args.n, args.seed, args.repeats)
            for s in (8, 16)
        }
        if args.batch_sizes:
            sizes = [int(b) for b in args.batch_sizes.split(",")]
            results["batch_size_8x8"] = batch_sweep(
                args.preset, args.vocab, args.batch_n, sizes, args.cfg, args.seed, args.repeats
            )
    print(
        json.dumps(
            {
                "benchmark": "sampling",
                "preset": args.preset,
                "vocab": args.vocab,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
