"""Training FLOPs per step of the paper's presets, counted with the trainers' own counter. Prints JSON.

python -m benchmarks.paper_flops [--out FILE]

- VIM-Base and VIM-Large at the paper's batch (1024 sequences of 1024 tokens): counted on the meta device
  (shapes only, no arithmetic), forward and backward, beside the 6N + 12 l d T estimate.
- ViT-VQGAN SS and BB at 256 px, 8x8 patches, 8192 codes: one real step at batch 1 on the CPU (the
  quantizer reads a value, which meta tensors cannot give), generator and discriminator forward and
  backward with the adversarial loss, times 256 for the paper's batch: every op here is per image, so
  the count is linear in the batch. LPIPS (VGG16) is not counted: its weights are not here.
docs/paper-scale.md turns these into wall times.
"""

import argparse
import json
import sys
import time

import torch

from benchmarks import host
from vim_core.config.tokenizer import LossConfig, TokenizerModelConfig
from vim_core.config.transformer import resolve_model
from vim_core.io import atomic_write_text
from vim_core.tokenizer.discriminator import Discriminator, d_loss, g_loss
from vim_core.tokenizer.losses import reconstruction_losses
from vim_core.tokenizer.model import build_tokenizer
from vim_core.train.flops import count_flops
from vim_core.transformer.gpt import VIM

TOKENIZER_BATCH = 256
VIM_BATCH = 1024


def vim_flops(preset: str) -> dict:
    with torch.device("meta"):
        cfg = resolve_model(preset).model_copy(update={"num_classes": 1000})
        model = VIM(cfg, 8192, 32).train()
        tokens = torch.randint(0, 8192, (VIM_BATCH, model.seq_len))
        labels = torch.randint(0, 1000, (VIM_BATCH,))

        def step() -> None:
            _, loss = model(tokens[:, :-1], labels, targets=tokens)
            loss.backward()

        flops = count_flops(step)
    return {
        "params": model.num_params(),
        "batch": VIM_BATCH,
        "tokens_per_sequence": model.seq_len,
        "flops_per_step": flops,
        "flops_per_step_6N_12ldT": int(model.flops_per_token() * VIM_BATCH * model.seq_len),
        "counted": "meta device, at the paper's batch",
    }


def tokenizer_flops(size: str) -> dict:
    torch.manual_seed(0)
    cfg = TokenizerModelConfig(encoder=size, decoder=size, patch_size=8, codebook_size=8192)
    loss_cfg = LossConfig(adversarial_weight=0.1)
    model = build_tokenizer(cfg, 256, 3).train()
    disc = Discriminator(256, 3, 32, 256)
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    started = time.perf_counter()

    def step() -> None:
        out = model(x)
        total = reconstruction_losses(out, x, loss_cfg)["total"]
        total = total + loss_cfg.adversarial_weight * g_loss(loss_cfg.gan_loss, disc(out.recon))
        total.backward()
        d_loss(loss_cfg.gan_loss, disc(x), disc(out.recon.detach())).backward()

    per_image = count_flops(step)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "disc_params": sum(p.numel() for p in disc.parameters()),
        "batch": TOKENIZER_BATCH,
        "flops_per_image": per_image,
        "flops_per_step": per_image * TOKENIZER_BATCH,
        "counted": "CPU, one real step at batch 1, times the batch",
        "seconds_to_count": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    result = {
        "benchmark": "paper_flops",
        "machine": host.machine(),
        "torch": torch.__version__,
        "counter": "vim_core.train.flops.count_flops (FlopCounterMode, CPU attention counted too), forward + backward",
        "vim": {p: vim_flops(p) for p in ("vim-base", "vim-large")},
        "tokenizer": {
            "SS": tokenizer_flops("small"),
            "BB": tokenizer_flops("base"),
        },
    }
    text = json.dumps(result, indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
