"""Train a ViT-VQGAN (or the CNN baseline) on a prepared dataset, then evaluate it on the test split."""

import contextlib
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vim_core.config.pipeline import TokenizerSection
from vim_core.data.shards import load_split, read_manifest
from vim_core.io import atomic_write_text
from vim_core.tokenizer.discriminator import Discriminator, d_loss, g_loss, r1_penalty
from vim_core.tokenizer.export import Tokenizer, save_tokenizer
from vim_core.tokenizer.losses import build_perceptual_loss, reconstruction_losses
from vim_core.tokenizer.metrics import codebook_perplexity, codebook_usage, psnr, throughput
from vim_core.tokenizer.model import VQTokenizer, build_tokenizer, to_model_range
from vim_core.tokenizer.palette import fit_palette_tokenizer
from vim_core.train import distributed as vdist
from vim_core.train import flops, run
from vim_core.train.checkpoint import code_digest, maybe_resume
from vim_core.train.loop import (
    EMA,
    autocast_context,
    check_finite,
    clip_grad,
    maybe_compile,
    set_seed,
    uses_bf16,
)
from vim_core.train.schedule import make_scheduler
from vim_core.train.tracking import Tracker

log = logging.getLogger(__name__)

TokenizerRun = run.TrainRun  # the name callers know


def tokenizer_fingerprint(cfg: TokenizerSection, data_version: str, seed: int) -> str:
    """Checkpoints resume only into a run with the same config, data, seed and model/trainer code."""
    spec = {
        "code": code_digest("tokenizer", "layers.py", "train", "data/shards.py"),
        "tokenizer": cfg.model_dump(mode="json", exclude={"out_dir", "checkpoint_dir", "eval"}),
        "data": data_version,
        "seed": seed,
    }
    spec["tokenizer"]["train"].pop("resume", None)
    # a checkpoint of N ranks resumes on M (docs/scaling.md)
    spec["tokenizer"]["train"].pop("processes", None)
    spec["tokenizer"]["train"].pop("select", None)  # only picks what is exported; every run tracks val
    return run.fingerprint(spec)


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


def _generator_losses(cfg: TokenizerSection, net, disc, perceptual, x, gan_on: bool, device):
    """The tokenizer's forward and its loss terms; D is frozen here and only passes gradients through."""
    with autocast_context(device, cfg.train.bf16):
        out = net(x)
        terms = reconstruction_losses(out, x, cfg.loss, perceptual)
        if gan_on:
            for p in disc.parameters():
                p.requires_grad_(False)
            terms["adversarial"] = cfg.loss.adversarial_weight * g_loss(cfg.loss.gan_loss, disc(out.recon))
            terms["total"] = terms["total"] + terms["adversarial"]
    return out, terms


def _discriminator_loss(cfg: TokenizerSection, disc, real, fake, with_r1: bool, device) -> dict:
    loss_cfg = cfg.loss
    with autocast_context(device, cfg.train.bf16):
        loss = d_loss(loss_cfg.gan_loss, disc(real), disc(fake))
    out = {"disc": loss.detach(), "loss": loss}
    if with_r1:
        # Lazy R1 (StyleGAN2): every r1_every steps, scaled up by the interval.
        r1 = r1_penalty(disc, real)
        out["loss"] = loss + loss_cfg.r1_weight * 0.5 * loss_cfg.r1_every * r1
        out["r1"] = r1.detach()
    return out


def _r1_due(cfg: TokenizerSection, step: int) -> bool:
    return cfg.loss.r1_weight > 0 and step % cfg.loss.r1_every == 0


def step_flops(
    cfg: TokenizerSection, ctx: run.RunContext, model, disc, perceptual, shape
) -> list[tuple[int, int]]:
    """FLOPs of one training step on this rank, as (first step, FLOPs) phases: before and after the GAN.

    Counted on copies with a synthetic batch of the real shape; the GAN phase adds D's own step, and
    R1's extra cost spread over its interval (it runs every r1_every steps).
    """
    device = ctx.device
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    m = flops.frozen_copy(model).train()
    d = flops.frozen_copy(disc).train() if disc is not None else None

    def generator(gan_on: bool):
        return lambda: _generator_losses(cfg, m, d, perceptual, x, gan_on, device)[1]["total"].backward()

    # Warm-up first, so a one-off codebook initialisation from data is not counted as a step.
    plain = flops.count_flops(generator(False), warmup=True)
    if d is None:
        return [(0, plain)]
    fake = x.flip(0)

    def disc_step(with_r1: bool):
        def run():
            for p in d.parameters():
                p.requires_grad_(True)
            _discriminator_loss(cfg, d, x, fake, with_r1, device)["loss"].backward()

        return run

    with_gan = flops.count_flops(generator(True))
    d_plain = flops.count_flops(disc_step(False))
    r1_extra = flops.count_flops(disc_step(True)) - d_plain if cfg.loss.r1_weight > 0 else 0
    gan_phase = with_gan + d_plain + round(r1_extra / cfg.loss.r1_every)
    return [(0, plain), (cfg.loss.adversarial_start_step, gan_phase)]


def train_tokenizer(
    cfg: TokenizerSection,
    data_root: str | Path,
    seed: int = 0,
    tracker: Tracker | None = None,
    plots_dir: str | Path | None = None,
) -> run.TrainRun:
    """Train, checkpoint, resume, evaluate and export. Under torchrun every rank calls this.

    Per-step metrics go to `tracker` and, with plots_dir, to CSVs there (tokenizer_loss.csv, ...) and to
    out_dir/log/metrics.jsonl; a resumed run rewrites those from its checkpoint's step on.
    """
    if cfg.model.arch == "palette":
        return fit_palette_run(cfg, data_root, seed, tracker, plots_dir)
    t = cfg.train
    manifest = read_manifest(data_root)
    image_size, channels = manifest["image_size"], manifest["channels"]
    n_train = manifest["splits"]["train"]["count"]
    ctx = run.start_run(t, "tokenizer", n_train, data_root)
    device = ctx.device  # cuda:LOCAL_RANK under torchrun on GPUs

    set_seed(seed)
    model = build_tokenizer(cfg.model, image_size, channels).to(device)
    # fails now, naming the file, if VGG/LPIPS weights are missing
    perceptual = build_perceptual_loss(cfg.loss)
    if perceptual is not None:
        perceptual = perceptual.to(device)
    disc = None
    if cfg.loss.adversarial_weight > 0:
        d = cfg.loss.discriminator
        disc = Discriminator(image_size, channels, d.width, d.max_width, d.mbstd_group).to(device)
    phases = step_flops(
        cfg, ctx, model, disc, perceptual, (ctx.local_batch, channels, image_size, image_size)
    )
    budget = flops.resolve_budget(t, "tokenizer", phases, ctx.info.world_size)
    fused = device.type == "cuda"  # one fused AdamW kernel per step on GPUs
    opt = _optimizer(_param_groups(model, cfg), cfg, fused)
    sched = make_scheduler(opt, t.schedule, budget.steps)
    modules: dict = {"model": model}
    optimizers: dict = {"model": opt}
    schedulers: dict = {"model": sched}
    opt_d = sched_d = None
    if disc is not None:
        opt_d = _optimizer([{"params": list(disc.parameters())}], cfg, fused)
        sched_d = make_scheduler(opt_d, t.schedule, budget.steps)
        modules["disc"], optimizers["disc"], schedulers["disc"] = disc, opt_d, sched_d
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    if ema is not None:
        modules["ema"] = ema

    # Choose only among weights trained on the full objective: from the GAN's first step on.
    gan_from = cfg.loss.adversarial_start_step if disc is not None else 0
    best = run.BestVal(model, after_step=gan_from if gan_from < budget.steps else 0)
    modules["best_val"] = best
    has_val = run.val_split(manifest) is not None
    fp = tokenizer_fingerprint(cfg, manifest.get("version", ""), seed)
    ckpt_dir = Path(cfg.checkpoint_dir) / fp
    start, _ = maybe_resume(ckpt_dir, t.resume, modules, optimizers, schedulers)
    if start >= budget.steps:
        log.info("checkpoint at step %d already covers the %d steps", start, budget.steps)
    tracker = run.open_tracker(ctx, tracker, cfg.out_dir, plots_dir, "tokenizer", start)

    net = maybe_compile(vdist.wrap_ddp(model, ctx.info), t.compile)
    if disc is not None:
        # D stays outside DDP: it runs frozen in the generator step and through R1's double backward,
        # which DDP's reducer cannot follow. Its gradients are averaged by hand (all_reduce_grads).
        vdist.broadcast_module(disc)
    batches = run.train_batches(ctx, data_root, t.batch_size, n_train, seed, start)
    tracker.log_params(
        {
            "tokenizer": cfg.model_dump(mode="json"),
            "seed": seed,
            "fingerprint": fp,
            "world_size": ctx.info.world_size,
            "steps": budget.steps,
        }
    )

    def step_fn(step: int, batch) -> run.StepResult:
        images, _ = batch
        x = to_model_range(images).to(device, non_blocking=True)
        gan_on = disc is not None and step >= cfg.loss.adversarial_start_step
        out, terms = _generator_losses(cfg, net, disc, perceptual, x, gan_on, device)
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
                terms.update(_discriminator_step(cfg, disc, opt_d, x, out.recon.detach(), step, device))
            with warnings.catch_warnings():  # before the GAN starts D's optimizer has not stepped yet
                warnings.simplefilter("ignore", UserWarning)
                sched_d.step()  # keep the D schedule in lockstep with the generator's
        if ema is not None:
            ema.update(model)
        # The quantizer's batch stats (usage, perplexity) already count the global batch.
        extra = {f"train/{k}": v for k, v in out.stats.items()}
        extra["train/grad_norm"] = grad_norm
        extra["train/lr"] = sched.get_last_lr()[0]
        return run.StepResult(terms, extra)

    save = run.checkpointer(ckpt_dir, modules, optimizers, schedulers, t.keep_checkpoints)
    if has_val:
        val_images, _ = load_split(data_root, "val", limit=t.val_examples)

        def val_loss(m: VQTokenizer) -> float:
            return val_reconstruction_loss(m, val_images, cfg, perceptual, device)

        exported = (
            (lambda: ema.applied_to(model)) if ema is not None else (lambda: contextlib.nullcontext(model))
        )
        save = run.validating_checkpointer(save, best, exported, val_loss, tracker)
    model.train()
    step_seconds: list[float] = []
    seconds = run.run_steps(
        ctx, t, budget.steps, start, batches, step_fn, save, tracker, "train_tokenizer", step_seconds
    )
    final = model
    if ema is not None:
        final = build_tokenizer(cfg.model, image_size, channels).to(device)
        final.load_state_dict(model.state_dict())
        ema.copy_to(final)
    selected = run.select_weights(t.select, best, final)
    final.eval()
    metrics = {
        **budget.metrics(ctx.info.world_size),
        "resumed_from": start,
        "train_seconds": round(seconds, 2),
        **run.step_time_metrics(step_seconds, budget.phases, start),
        "autocast": "bf16" if uses_bf16(device, cfg.train.bf16) else "fp32",  # what ran (train.bf16)
        "world_size": ctx.info.world_size,
        "fingerprint": fp,
        "selected": selected,
        **best.metrics(),
        "val_loss_definition": f"weighted reconstruction terms (no VQ or GAN term) over the first "
        f"{t.val_examples} val images, at every checkpoint",
    }
    out_dir = Path(cfg.out_dir)
    model_path = out_dir / "tokenizer.safetensors"
    if ctx.info.is_main:
        metrics.update(evaluate_tokenizer(final, data_root, cfg, device, plots_dir))
        metrics.update(throughput(final, channels, image_size, device))
        out_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(final, cfg.model, str(model_path))
        if plots_dir is not None:
            best.write_csv(Path(plots_dir) / "tokenizer_val_loss.csv")
        tracker.log_metrics(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, budget.steps
        )
    vdist.barrier()
    return run.TrainRun(model=final, metrics=metrics, model_path=model_path)


@torch.no_grad()
def val_reconstruction_loss(
    model: VQTokenizer, images: np.ndarray, cfg: TokenizerSection, perceptual, device, batch_size: int = 64
) -> float:
    """Mean weighted reconstruction loss (l2, logit-Laplace, perceptual; no VQ or GAN term) over `images`.

    Cost: one eval-mode forward over len(images) images (256 by default) per checkpoint, no backward.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    for lo in range(0, len(images), batch_size):
        x = to_model_range(images[lo : lo + batch_size]).to(device)
        terms = reconstruction_losses(model(x), x, cfg.loss, perceptual)
        recon = [v for k, v in terms.items() if k not in ("vq", "total")]
        total += float(sum(recon) if recon else F.mse_loss(model(x).recon, x)) * len(x)
    model.train(was_training)
    return total / len(images)


def fit_palette_run(cfg: TokenizerSection, data_root, seed: int, tracker, plots_dir) -> run.TrainRun:
    """The iGPT baseline's tokenizer: a k-means colour palette, fitted rather than trained, so it takes no
    gradient steps and no FLOP budget (train.steps/flops are not used). Its train_flops are the fit's
    arithmetic, counted analytically. Evaluated and exported like the rest."""
    info = vdist.init_distributed(cfg.train.device)
    started = time.monotonic()
    fit: dict = {}
    model = fit_palette_tokenizer(cfg.model, data_root, seed, stats=fit).to(info.device).eval()
    metrics = {
        "steps": 0,
        "train_flops": float(fit["flops"]),
        "flops_per_step": 0.0,
        "flops_definition": (
            f"no gradient training: the k-means palette fit ({fit['pixels']} pixels, "
            f"{cfg.model.palette_clusters} colours, {fit['lloyd_iterations']} Lloyd iterations), counted "
            "analytically (vim_core.tokenizer.palette.kmeans_flops), not by FlopCounterMode"
        ),
        "fit_seconds": round(time.monotonic() - started, 2),
        "resumed_from": 0,
        "world_size": info.world_size,
    }
    model_path = Path(cfg.out_dir) / "tokenizer.safetensors"
    if info.is_main:
        metrics.update(evaluate_tokenizer(model, data_root, cfg, info.device, plots_dir))
        metrics.update(throughput(model, model.channels, model.image_size, info.device))
        model_path.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer(model, cfg.model, str(model_path))
        if plots_dir is not None:
            _write_empty_curves(Path(plots_dir))
            # the val curve as a trained tokenizer writes it; no checkpoints, so no rows
            run.BestVal(model).write_csv(Path(plots_dir) / "tokenizer_val_loss.csv")
        if tracker is not None:
            tracker.log_params({"tokenizer": cfg.model_dump(mode="json"), "seed": seed})
            tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, 0)
    vdist.barrier()
    return run.TrainRun(model=model, metrics=metrics, model_path=model_path)


# The stage's per-step curves (dvc.yaml); a palette fit takes no steps, so it writes them with a header and
# no rows (the val curve comes from BestVal, as for a trained tokenizer): the stage then has every output it
# declares, and an earlier tokenizer's curves (kept by `persist: true`) are not shown as the palette's.
STEP_CURVES = ("tokenizer_loss.csv", "tokenizer_train.csv")


def _write_empty_curves(plots_dir: Path) -> None:
    for name in STEP_CURVES:
        atomic_write_text(plots_dir / name, "step\n")


def _discriminator_step(cfg, disc, opt_d, real, fake, step, device) -> dict:
    out = _discriminator_loss(cfg, disc, real, fake, _r1_due(cfg, step), device)
    loss = out.pop("loss")
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
