"""Train a ViT-VQGAN (or the CNN baseline) on a prepared dataset, then evaluate it on the test split."""

import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vim_core.config.pipeline import TokenizerSection
from vim_core.data.shards import iter_batches, load_split, read_manifest
from vim_core.errors import VimError
from vim_core.tokenizer.discriminator import Discriminator, d_loss, g_loss, r1_penalty
from vim_core.tokenizer.export import Tokenizer, save_tokenizer
from vim_core.tokenizer.losses import build_perceptual_loss, reconstruction_losses
from vim_core.tokenizer.metrics import codebook_perplexity, codebook_usage, psnr
from vim_core.tokenizer.model import VQTokenizer, build_tokenizer, to_model_range
from vim_core.train import distributed as vdist
from vim_core.train.checkpoint import code_digest, maybe_resume, save_checkpoint
from vim_core.train.loop import (
    EMA,
    autocast_context,
    check_finite,
    clip_grad,
    enable_tf32,
    maybe_compile,
    progress,
    resumable_batches,
    set_seed,
)
from vim_core.train.schedule import make_scheduler
from vim_core.train.tracking import JsonlTracker, MultiTracker, NullTracker, Tracker

log = logging.getLogger(__name__)


@dataclass
class TokenizerRun:
    model: VQTokenizer  # the weights that were evaluated (EMA when on)
    metrics: dict
    model_path: Path


def fingerprint(cfg: TokenizerSection, data_version: str, seed: int) -> str:
    """Checkpoints resume only into a run with the same config, data, seed and model/trainer code."""
    spec = {
        "code": code_digest("tokenizer", "layers.py", "train", "data/shards.py"),
        "tokenizer": cfg.model_dump(mode="json", exclude={"out_dir", "checkpoint_dir", "eval"}),
        "data": data_version,
        "seed": seed,
    }
    spec["tokenizer"]["train"].pop("resume", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _optimizer(params_groups: list[dict], cfg: TokenizerSection, fused: bool) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(
        params_groups, lr=t.schedule.peak_lr, betas=t.betas, weight_decay=t.weight_decay, **kwargs
    )


def _param_groups(model: VQTokenizer, cfg: TokenizerSection) -> list[dict]:
    codebook = {id(p) for p in model.codebook_parameters()}
    rest = [p for p in model.parameters() if id(p) not in codebook]
    groups = [{"params": rest}]
    if codebook:
        mult = cfg.model.codebook_lr_multiplier
        # LambdaLR scales each group's initial lr, so the multiplier survives the schedule.
        groups.append(
            {
                "params": [p for p in model.parameters() if id(p) in codebook],
                "lr": cfg.train.schedule.peak_lr * mult,
            }
        )
    return groups


def train_tokenizer(
    cfg: TokenizerSection,
    data_root: str | Path,
    seed: int = 0,
    tracker: Tracker | None = None,
    plots_dir: str | Path | None = None,
) -> TokenizerRun:
    """Train, checkpoint, resume, evaluate and export. Under torchrun every rank calls this.

    Per-step metrics go to `tracker` and, with plots_dir, to CSVs there (tokenizer_loss.csv, ...) and to
    out_dir/log/metrics.jsonl; a resumed run rewrites those from its checkpoint's step on.
    """
    info = vdist.init_distributed(cfg.train.device)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = info.device  # cuda:LOCAL_RANK under torchrun on GPUs
    enable_tf32(device)
    manifest = read_manifest(data_root)
    image_size, channels = manifest["image_size"], manifest["channels"]
    if t.batch_size % info.world_size:
        raise VimError(
            f"tokenizer.train.batch_size {t.batch_size} must divide by the {info.world_size} ranks"
        )
    local_batch = t.batch_size // info.world_size
    if manifest["splits"]["train"]["count"] < t.batch_size:
        raise VimError(
            f"{data_root}: {manifest['splits']['train']['count']} train images, fewer than one batch"
        )

    set_seed(seed)
    model = build_tokenizer(cfg.model, image_size, channels).to(device)
    perceptual = build_perceptual_loss(
        cfg.loss
    )  # fails now, naming the file, if VGG/LPIPS weights are missing
    if perceptual is not None:
        perceptual = perceptual.to(device)
    use_gan = cfg.loss.adversarial_weight > 0
    disc = None
    if use_gan:
        d = cfg.loss.discriminator
        disc = Discriminator(image_size, channels, d.width, d.max_width, d.mbstd_group).to(device)
    fused = device.type == "cuda"  # one fused AdamW kernel per step on GPUs
    opt = _optimizer(_param_groups(model, cfg), cfg, fused)
    sched = make_scheduler(opt, t.schedule, t.steps)
    modules: dict = {"model": model}
    optimizers: dict = {"model": opt}
    schedulers: dict = {"model": sched}
    if disc is not None:
        opt_d = _optimizer([{"params": list(disc.parameters())}], cfg, fused)
        sched_d = make_scheduler(opt_d, t.schedule, t.steps)
        modules["disc"], optimizers["disc"], schedulers["disc"] = disc, opt_d, sched_d
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    if ema is not None:
        modules["ema"] = ema

    fp = fingerprint(cfg, manifest.get("version", ""), seed)
    ckpt_dir = Path(cfg.checkpoint_dir) / fp
    start, _ = maybe_resume(ckpt_dir, t.resume, modules, optimizers, schedulers)
    if start >= t.steps:
        log.info("checkpoint at step %d already covers the %d steps", start, t.steps)
    # Only rank 0 tracks (MLflow, JSONL, CSV); the other ranks log nothing.
    trackers = [tracker] if tracker is not None and info.is_main else []
    if plots_dir is not None and info.is_main:
        trackers.append(
            JsonlTracker(Path(cfg.out_dir) / "log", plots_dir, prefix="tokenizer", start_step=start)
        )
    tracker = MultiTracker(*trackers) if trackers else NullTracker()

    net = maybe_compile(vdist.wrap_ddp(model, info), t.compile)
    if disc is not None:
        # D stays outside DDP: it runs frozen in the generator step and through R1's double backward,
        # which DDP's reducer cannot follow. Its gradients are averaged by hand (all_reduce_grads).
        vdist.broadcast_module(disc)

    def epoch_batches(epoch: int):
        return iter_batches(
            data_root,
            "train",
            local_batch,
            seed=seed * 100_003 + epoch,
            rank=info.rank,
            world_size=info.world_size,
            drop_last=True,
        )

    per_epoch = manifest["splits"]["train"]["count"] // t.batch_size
    batches = resumable_batches(epoch_batches, start, batches_per_epoch=per_epoch)
    tracker.log_params(
        {
            "tokenizer": cfg.model_dump(mode="json"),
            "seed": seed,
            "fingerprint": fp,
            "world_size": info.world_size,
        }
    )
    started = time.monotonic()
    bar = progress(total=t.steps, initial=start, desc="train_tokenizer")
    model.train()
    for step in range(start, t.steps):
        _, (images, _) = next(batches)
        x = to_model_range(images).to(device, non_blocking=True)
        gan_on = use_gan and step >= cfg.loss.adversarial_start_step
        with autocast_context(device, t.bf16):
            out = net(x)
            terms = reconstruction_losses(out, x, cfg.loss, perceptual)
            if gan_on:
                for p in disc.parameters():
                    p.requires_grad_(False)
                terms["adversarial"] = cfg.loss.adversarial_weight * g_loss(
                    cfg.loss.gan_loss, disc(out.recon)
                )
                terms["total"] = terms["total"] + terms["adversarial"]
        check_finite(terms, step)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        grad_norm = clip_grad(model, t.grad_clip)
        opt.step()
        sched.step()
        if disc is not None:
            for p in disc.parameters():
                p.requires_grad_(True)
            if gan_on:
                terms.update(
                    _discriminator_step(cfg, disc, opt_d, x, out.recon.detach(), step, t.bf16, device)
                )
            with warnings.catch_warnings():  # before the GAN starts D's optimizer has not stepped yet
                warnings.simplefilter("ignore", UserWarning)
                sched_d.step()  # keep the D schedule in lockstep with the generator's
        if ema is not None:
            ema.update(model)
        bar.update(1)
        if step % t.log_every == 0 or step == t.steps - 1:
            # Losses are averaged over ranks (a collective, so every rank joins): the loss of the global
            # batch. The quantizer's batch stats (usage, perplexity) already count the global batch.
            losses = vdist.all_reduce_mean_dict(terms)
            if info.is_main:
                metrics = {f"loss/{k}": v for k, v in losses.items()}
                metrics.update({f"train/{k}": v for k, v in out.stats.items()})
                metrics["train/grad_norm"] = grad_norm
                metrics["train/lr"] = sched.get_last_lr()[0]
                tracker.log_metrics(metrics, step)
                bar.set_postfix(
                    loss=f"{losses['total'].item():.4f}", usage=f"{out.stats['usage'].item():.2f}"
                )
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            save_checkpoint(ckpt_dir, step + 1, modules, optimizers, schedulers, keep_last=t.keep_checkpoints)
    bar.close()
    train_seconds = time.monotonic() - started

    final = model
    if ema is not None:
        final = build_tokenizer(cfg.model, image_size, channels).to(device)
        final.load_state_dict(model.state_dict())
        ema.copy_to(final)
    final.eval()
    metrics = {
        "steps": t.steps,
        "resumed_from": start,
        "train_seconds": round(train_seconds, 2),
        "world_size": info.world_size,
        "fingerprint": fp,
    }
    out_dir = Path(cfg.out_dir)
    model_path = out_dir / "tokenizer.safetensors"
    if info.is_main:
        metrics.update(evaluate_tokenizer(final, data_root, cfg, device, plots_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(final, cfg.model, str(model_path))
        tracker.log_metrics(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, t.steps
        )
    vdist.barrier()
    return TokenizerRun(model=final, metrics=metrics, model_path=model_path)


def _discriminator_step(cfg, disc, opt_d, real, fake, step, bf16, device) -> dict:
    loss_cfg = cfg.loss
    with autocast_context(device, bf16):
        loss = d_loss(loss_cfg.gan_loss, disc(real), disc(fake))
    out = {"disc": loss.detach()}
    if loss_cfg.r1_weight > 0 and step % loss_cfg.r1_every == 0:
        # Lazy R1 (StyleGAN2): every r1_every steps, scaled up by the interval.
        r1 = r1_penalty(disc, real)
        loss = loss + loss_cfg.r1_weight * 0.5 * loss_cfg.r1_every * r1
        out["r1"] = r1.detach()
    check_finite(out, step)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    vdist.all_reduce_grads(disc)  # what DDP does for the generator
    clip_grad(disc, cfg.train.grad_clip)
    opt_d.step()
    return out


@torch.no_grad()
def evaluate_tokenizer(
    model: Tokenizer,
    data_root: str | Path,
    cfg: TokenizerSection,
    device: torch.device,
    plots_dir: str | Path | None = None,
) -> dict:
    """Test-split reconstruction metrics and codebook usage in the paper's definition.

    Pixel metrics use the float reconstruction (clamped), not its uint8 rounding, on the same batches.
    """
    e = cfg.eval
    images, _ = load_split(data_root, "test", e.max_test_images)
    b = e.usage_batch_size
    idx = model.encode_uint8(images, b)
    l1s, l2s, psnrs = [], [], []
    for i in range(0, len(images), b):
        x01 = (to_model_range(images[i : i + b]).to(device) + 1) / 2
        r01 = (model.decode(idx[i : i + b].to(device)).clamp(-1, 1) + 1) / 2
        n = len(x01)
        l1s.append(float(F.l1_loss(r01, x01)) * n)
        l2s.append(float(F.mse_loss(r01, x01)) * n)
        psnrs.append(float(psnr(r01, x01)) * n)
    n = len(images)
    k = model.codebook_size
    metrics = {
        "codebook_usage": round(codebook_usage(idx, k, b), 4),
        "codebook_usage_definition": f"fraction of the {k} codes used per batch of {b} test "
        f"images, averaged over the full batches of the test split ({n} images)",
        "codebook_usage_all_test": round(
            float(torch.bincount(idx.flatten(), minlength=k).gt(0).float().mean()), 4
        ),
        "codebook_perplexity": round(codebook_perplexity(idx, k), 2),
        "psnr": round(sum(psnrs) / n, 3),
        "l1": round(sum(l1s) / n, 5),
        "l2": round(sum(l2s) / n, 6),
        "test_images": n,
        "pixel_range": "metrics on pixels scaled to [0, 1]",
    }
    if plots_dir is not None:
        save_reconstruction_grid(
            model, images[: e.grid_images], Path(plots_dir) / "tokenizer_reconstructions.png"
        )
    return metrics


def save_reconstruction_grid(model: Tokenizer, images: np.ndarray, path: Path, per_row: int = 8) -> None:
    """Originals on one row, their reconstructions on the row below, `per_row` per row."""
    from torchvision.utils import make_grid, save_image

    recon = torch.from_numpy(model.decode_uint8(model.encode_uint8(images)))
    rows = []
    for lo in range(0, len(images), per_row):
        a, b = torch.from_numpy(images[lo : lo + per_row]), recon[lo : lo + per_row]
        blank = torch.zeros(per_row - len(a), *a.shape[1:], dtype=torch.uint8)  # a short last row
        rows += [a, blank, b, blank]
    grid = make_grid(torch.cat(rows).float() / 255, nrow=per_row, padding=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
