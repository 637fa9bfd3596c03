"""The discriminator's forward + backward with NCHW against NHWC (channels_last) activations; prints JSON.

    python -m benchmarks.discriminator_layout [--batch 64] [--steps 20] [--rounds 3] [--set K=V]

The discriminator of params.yaml (width, max width, image size, channels), built with the same weights
both ways (`channels_last` False, the default, and True). The arms alternate, round
by round, in one process, so a busy machine slows both alike; the median round decides.
"""

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from vim_core.config import ConfigError, apply_overrides, load_params
from vim_core.tokenizer.discriminator import Discriminator


def step_ms(disc: nn.Module, x: torch.Tensor, steps: int) -> float:
    for _ in range(2):
        disc(x).sum().backward()
    start = time.perf_counter()
    for _ in range(steps):
        disc(x).sum().backward()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        params = apply_overrides(load_params(args.params), args.set)
    except ConfigError as err:
        print(f"discriminator_layout: {err}", file=sys.stderr)
        return 2
    d, data = params.tokenizer.loss.discriminator, params.data
    torch.manual_seed(0)
    x = torch.randn(args.batch, data.channels, data.image_size, data.image_size, requires_grad=True)

    def build(channels_last: bool) -> Discriminator:
        torch.manual_seed(0)
        return Discriminator(
            data.image_size, data.channels, d.width, d.max_width, d.mbstd_group, channels_last=channels_last
        )

    arms = {"nchw": build(False), "nhwc": build(True)}
    rounds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, disc in arms.items():
            rounds[name].append(step_ms(disc, x, args.steps))
    median = {k: round(statistics.median(v), 1) for k, v in rounds.items()}
    print(
        json.dumps(
            {
                "benchmark": "discriminator_layout",
                "batch": args.batch,
                "image_size": data.image_size,
                "width": d.width,
                "max_width": d.max_width,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "ms_per_forward_backward": median,
                "rounds_ms": {k: [round(t, 1) for t in v] for k, v in rounds.items()},
                "nhwc_speedup": round(median["nchw"] / median["nhwc"], 2),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
