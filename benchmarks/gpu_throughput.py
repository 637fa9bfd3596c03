"""Training throughput and MFU on one CUDA GPU: the SS tokenizer at 256 px and a VIM-Base step; prints JSON.

    python benchmarks/gpu_throughput.py [--tok-batch 32] [--vim-batch 16] [--steps 10] [--warmup 3]
                                        [--no-compile] [--no-bf16] [--peak-tflops 989] [--only tokenizer]

Both steps run as the trainers run them on a GPU: bf16 autocast, torch.compile, TF32 and fused AdamW.
- tokenizer: ViT-VQGAN SS (Small encoder and decoder), 256 px, 8x8 patches (32x32 = 1024 tokens),
  8192 codes, L2 + VQ + adversarial loss, and the discriminator step (no R1, no LPIPS); images/s of
  training, and images/s of encoding (inference) as in the paper's throughput column.
- transformer: VIM-Base (24 layers, dim 1536, 650M parameters), 1024 tokens of an 8192-code
  vocabulary, class-conditional; tokens/s of training.
Both report peak GPU memory (torch.cuda.max_memory_allocated, reset before each).
MFU = achieved FLOP/s over the GPU's dense bf16 peak. FLOPs per step are counted with
torch.utils.flop_counter on one uncompiled step (for VIM also the 6N + 12 l d T estimate). The peak is
looked up from the device name (H100/H200/A100/L4/L40S) or given with --peak-tflops.
--smoke runs tiny models on any device (also CPU) to check the script itself; its numbers mean nothing.
benchmarks/gpu_acceptance.py calls bench() with its own Settings.
"""

import argparse
import gc
import json
import platform
import statistics
import sys
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from vim_core.config.tokenizer import LossConfig, TokenizerModelConfig
from vim_core.config.transformer import resolve_model
from vim_core.timing import time_calls
from vim_core.tokenizer.discriminator import Discriminator, d_loss, g_loss
from vim_core.tokenizer.losses import reconstruction_losses
from vim_core.tokenizer.model import build_tokenizer
from vim_core.train.loop import autocast_context, enable_tf32
from vim_core.transformer.gpt import VIM

# Dense bf16 tensor-core peaks from the vendor data sheets, TFLOP/s (no sparsity).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


@dataclass
class Settings:
    """What one benchmark run measures; main() fills it from the command line."""

    tok_batch: int = 32
    vim_batch: int = 16
    steps: int = 10
    warmup: int = 3
    compile: bool = True
    bf16: bool = True
    peak_tflops: float | None = None
    smoke: bool = False


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if all(part in name for part in key.split()):
            return value
    return None


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def timed(step, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per step after `warmup` steps (which include torch.compile's compilation)."""
    return statistics.median(time_calls(step, device, steps, warmup))


def reset_peak_memory(device: torch.device) -> None:
    """Free what earlier parts left cached, so the next peak is this part's own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset_peak_memory; None on the CPU."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def tokenizer_bench(args: Settings, device: torch.device) -> dict:
    image_size, channels = (32, 3) if args.smoke else (256, 3)
    tiny = {"blocks": 1, "heads": 2, "dim": 32, "mlp_dim": 64}
    cfg = TokenizerModelConfig(
        encoder=tiny if args.smoke else "small",
        decoder=tiny if args.smoke else "small",
        patch_size=4 if args.smoke else 8,
        codebook_size=64 if args.smoke else 8192,
    )
    loss_cfg = LossConfig(adversarial_weight=0.1)
    reset_peak_memory(device)
    model = build_tokenizer(cfg, image_size, channels).to(device).train()
    disc = Discriminator(image_size, channels, 8 if args.smoke else 32, 16 if args.smoke else 256).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4, **fused)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4, **fused)
    x = torch.rand(args.tok_batch, channels, image_size, image_size, device=device) * 2 - 1

    def step(net) -> None:
        with autocast_context(device, args.bf16):
            out = net(x)
            total = reconstruction_losses(out, x, loss_cfg)["total"]
            disc.requires_grad_(False)
            total = total + loss_cfg.adversarial_weight * g_loss(loss_cfg.gan_loss, disc(out.recon))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        disc.requires_grad_(True)
        with autocast_context(device, args.bf16):
            loss_d = d_loss(loss_cfg.gan_loss, disc(x), disc(out.recon.detach()))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

    @torch.inference_mode()
    def encode(net) -> None:
        with autocast_context(device, args.bf16):
            net.encode(x)

    flops = count_flops(lambda: step(model))
    net = torch.compile(model) if args.compile else model
    seconds = timed(lambda: step(net), device, args.steps, args.warmup)
    model.eval()  # encoding as tokenize_dataset does it: eval mode, uncompiled
    encode_seconds = timed(lambda: encode(model), device, args.steps, 1)
    return {
        "preset": "smoke" if args.smoke else "SS, 256 px, patch 8, 8192 codes",
        "params": sum(p.numel() for p in model.parameters()),
        "disc_params": sum(p.numel() for p in disc.parameters()),
        "batch": args.tok_batch,
        "step_ms": round(seconds * 1e3, 2),
        "train_images_per_s": round(args.tok_batch / seconds, 1),
        "train_tokens_per_s": round(args.tok_batch * model.num_tokens / seconds, 1),
        "tokens_per_image": model.num_tokens,
        "encode_images_per_s": round(args.tok_batch / encode_seconds, 1),
        "flops_per_step_counted": flops,
        "achieved_tflops": round(flops / seconds / 1e12, 2),
        "mfu": _mfu(flops / seconds, args),
        "peak_memory_gib": peak_memory_gib(device),
    }


def transformer_bench(args: Settings, device: torch.device) -> dict:
    if args.smoke:
        # As params.yaml trains it, label dropout included.
        cfg = resolve_model("tiny").model_copy(update={"num_classes": 10, "cfg_dropout": 0.1})
        vocab, grid = 64, 8
    else:
        cfg = resolve_model("vim-base")
        vocab, grid = 8192, 32
    reset_peak_memory(device)
    model = VIM(cfg, vocab, grid).to(device).train()
    opt = model.configure_optimizers(0.01, 4.5e-4, (0.9, 0.96))  # fused AdamW on CUDA
    tokens = torch.randint(0, vocab, (args.vim_batch, model.seq_len), device=device)
    labels = torch.randint(0, cfg.num_classes, (args.vim_batch,), device=device) if cfg.num_classes else None

    def step(net) -> None:
        with autocast_context(device, args.bf16):
            _, loss = net(tokens[:, :-1], labels, targets=tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    flops = count_flops(lambda: step(model))
    net = torch.compile(model) if args.compile else model
    seconds = timed(lambda: step(net), device, args.steps, args.warmup)
    n_tokens = args.vim_batch * model.seq_len
    analytic = model.flops_per_token() * n_tokens
    return {
        "preset": "smoke" if args.smoke else "vim-base, 32x32 tokens, 8192 codes",
        "params": model.num_params(),
        "batch": args.vim_batch,
        "seq_len": model.seq_len,
        "step_ms": round(seconds * 1e3, 2),
        "tokens_per_s": round(n_tokens / seconds, 1),
        "images_per_s": round(args.vim_batch / seconds, 2),
        "flops_per_step_counted": flops,
        "flops_per_step_6N_12ldT": int(analytic),
        "achieved_tflops": round(flops / seconds / 1e12, 2),
        "mfu": _mfu(flops / seconds, args),
        "mfu_6N_12ldT": _mfu(analytic / seconds, args),
        "peak_memory_gib": peak_memory_gib(device),
    }


def _mfu(flops_per_s: float, args: Settings) -> float | None:
    """Fraction of the bf16 peak; None when the peak of this GPU is unknown (pass --peak-tflops)."""
    return round(flops_per_s / (args.peak_tflops * 1e12), 4) if args.peak_tflops else None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def bench(args: Settings, only: str | None = None) -> dict:
    """Both steps (or `only` one) on the default CUDA device, else the CPU; the JSON main() prints."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enable_tf32(device)
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = peak_tflops(device_name(device))
    if args.smoke:
        args.compile = False
        args.tok_batch, args.vim_batch = min(args.tok_batch, 4), min(args.vim_batch, 4)
    torch.manual_seed(0)
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "bf16": args.bf16,
        "compile": args.compile,
        "tf32": device.type == "cuda",
        "fused_adamw": device.type == "cuda",
        "peak_bf16_tflops": args.peak_tflops,
        "smoke": args.smoke,
    }
    if only in (None, "tokenizer"):
        result["tokenizer"] = tokenizer_bench(args, device)
    if only in (None, "transformer"):
        result["transformer"] = transformer_bench(args, device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tok-batch", type=int, default=32)
    parser.add_argument("--vim-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    parser.add_argument("--only", choices=["tokenizer", "transformer"], default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny models on any device, to test the script")
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit(
            "gpu_throughput: torch sees no CUDA device; this benchmark measures GPUs only (--smoke tests it)"
        )
    only = args.only
    del args.only
    print(json.dumps(bench(Settings(**vars(args)), only), indent=2))


if __name__ == "__main__":
    main()
