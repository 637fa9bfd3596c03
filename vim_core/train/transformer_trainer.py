"""Pretrain VIM on token shards: next-token prediction in raster order, optionally class-conditional."""

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vim_core.config.pipeline import TransformerSection
from vim_core.config.transformer import TransformerModelConfig
from vim_core.data.shards import iter_batches, iter_shards, read_manifest
from vim_core.errors import VimError
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
from vim_core.transformer.export import save_transformer
from vim_core.transformer.gpt import VIM

log = logging.getLogger(__name__)


@dataclass
class TransformerRun:
    model: VIM
    metrics: dict
    model_path: Path


def model_config_for(cfg: TransformerSection, tokens_manifest: dict) -> TransformerModelConfig:
    """A conditional model takes its class count from the data, so presets work on any labelled set."""
    model_cfg = cfg.resolved_model()
    if model_cfg.num_classes > 0 and model_cfg.num_classes != tokens_manifest["num_classes"]:
        model_cfg = model_cfg.model_copy(update={"num_classes": tokens_manifest["num_classes"]})
    return model_cfg


def build_vim(cfg: TransformerSection, tokens_manifest: dict) -> VIM:
    return VIM(
        model_config_for(cfg, tokens_manifest),
        tokens_manifest["codebook_size"],
        tuple(tokens_manifest["grid"]),
    )


def fingerprint(cfg: TransformerSection, tokens_manifest: dict, seed: int) -> str:
    """Checkpoints resume only into a run with the same config, tokens, seed and model/trainer code."""
    spec = {
        "code": code_digest("transformer", "layers.py", "train", "data/shards.py"),
        "model": model_config_for(cfg, tokens_manifest).model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude={"resume"}),
        "tokens": [s["sha256"] for sp in tokens_manifest["splits"].values() for s in sp["shards"]],
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def bits_per_token(
    model: VIM,
    tokens_dir: str | Path,
    split: str,
    device: torch.device,
    conditional: bool,
    batch_size: int = 256,
    limit: int | None = None,
) -> float:
    """Mean next-token NLL over a split, in bits (the paper's validation metric)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for tokens, labels in iter_shards(tokens_dir, split):
        for lo in range(0, len(tokens), batch_size):
            x = torch.from_numpy(tokens[lo : lo + batch_size].astype("int64")).to(device)
            y = torch.from_numpy(labels[lo : lo + batch_size]).to(device) if conditional else None
            _, loss = model(x[:, :-1], y, targets=x)
            total += float(loss) * x.numel()
            count += x.numel()
            if limit is not None and count >= limit * x.shape[1]:
                break
    model.train(was_training)
    return total / max(count, 1) / math.log(2)


def train_transformer(
    cfg: TransformerSection,
    seed: int = 0,
    tracker: Tracker | None = None,
    plots_dir: str | Path | None = None,
) -> TransformerRun:
    """Train, checkpoint, resume, measure validation bits/token and export. Every torchrun rank calls this."""
    info = vdist.init_distributed(cfg.train.device)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = info.device  # cuda:LOCAL_RANK under torchrun on GPUs
    enable_tf32(device)
    manifest = read_manifest(cfg.tokens_dir)
    if t.batch_size % info.world_size:
        raise VimError(
            f"transformer.train.batch_size {t.batch_size} must divide by the {info.world_size} ranks"
        )
    local_batch = t.batch_size // info.world_size
    n_train = manifest["splits"]["train"]["count"]
    if n_train < t.batch_size:
        raise VimError(f"{cfg.tokens_dir}: {n_train} train sequences, fewer than one batch of {t.batch_size}")

    set_seed(seed)
    model = build_vim(cfg, manifest).to(device)
    conditional = model.num_classes > 0
    opt = model.configure_optimizers(t.weight_decay, t.schedule.peak_lr, t.betas)  # fused on CUDA
    sched = make_scheduler(opt, t.schedule, t.steps)
    modules: dict = {"model": model}
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    if ema is not None:
        modules["ema"] = ema
    fp = fingerprint(cfg, manifest, seed)
    ckpt_dir = Path(cfg.checkpoint_dir) / fp
    start, _ = maybe_resume(ckpt_dir, t.resume, modules, {"model": opt}, {"model": sched})
    # Only rank 0 tracks (MLflow, JSONL, CSV); the other ranks log nothing.
    trackers = [tracker] if tracker is not None and info.is_main else []
    if plots_dir is not None and info.is_main:
        trackers.append(
            JsonlTracker(Path(cfg.out_dir) / "log", plots_dir, prefix="transformer", start_step=start)
        )
    tracker = MultiTracker(*trackers) if trackers else NullTracker()
    tracker.log_params(
        {
            "transformer": cfg.model_dump(mode="json"),
            "seed": seed,
            "fingerprint": fp,
            "world_size": info.world_size,
            "params": model.num_params(),
        }
    )

    net = maybe_compile(vdist.wrap_ddp(model, info), t.compile)

    def epoch_batches(epoch: int):
        return iter_batches(
            cfg.tokens_dir,
            "train",
            local_batch,
            seed=seed * 100_003 + epoch,
            rank=info.rank,
            world_size=info.world_size,
            drop_last=True,
        )

    batches = resumable_batches(epoch_batches, start, batches_per_epoch=n_train // t.batch_size)
    started = time.monotonic()
    bar = progress(total=t.steps, initial=start, desc="pretrain_transformer")
    model.train()
    for step in range(start, t.steps):
        _, (tokens, labels) = next(batches)
        x = torch.from_numpy(tokens.astype("int64")).to(device, non_blocking=True)
        y = torch.from_numpy(labels).to(device) if conditional else None
        with autocast_context(device, t.bf16):
            _, loss = net(x[:, :-1], y, targets=x)
        check_finite({"loss": loss}, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad(model, t.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        bar.update(1)
        if step % t.log_every == 0 or step == t.steps - 1:
            mean_loss = vdist.all_reduce_mean(loss.detach())  # the global batch's loss; every rank joins
            if info.is_main:
                tracker.log_metrics(
                    {
                        "loss/train": mean_loss,
                        "loss/train_bits_per_token": mean_loss / math.log(2),
                        "train/grad_norm": grad_norm,
                        "train/lr": sched.get_last_lr()[0],
                    },
                    step,
                )
                bar.set_postfix(loss=f"{mean_loss.item():.3f}")
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            save_checkpoint(
                ckpt_dir, step + 1, modules, {"model": opt}, {"model": sched}, keep_last=t.keep_checkpoints
            )
    bar.close()
    train_seconds = time.monotonic() - started
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    steps_run = t.steps - start
    metrics = {
        "steps": t.steps,
        "resumed_from": start,
        "train_seconds": round(train_seconds, 2),
        "world_size": info.world_size,
        "fingerprint": fp,
        "params": model.num_params(),
        "tokens_per_second": round(steps_run * t.batch_size * model.seq_len / max(train_seconds, 1e-9), 1),
    }
    out_path = Path(cfg.out_dir) / "transformer.safetensors"
    if info.is_main:
        metrics["val_bits_per_token"] = round(
            bits_per_token(model, cfg.tokens_dir, "test", device, conditional), 4
        )
        metrics["val_definition"] = "mean next-token NLL in bits over every token of the test split"
        tracker.log_metrics({"eval/val_bits_per_token": metrics["val_bits_per_token"]}, t.steps)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_transformer(
            model,
            str(out_path),
            extra={
                "tokenizer_sha256": manifest.get("tokenizer_sha256"),
                "class_names": manifest.get("class_names"),
            },
        )
    vdist.barrier()
    return TransformerRun(model=model, metrics=metrics, model_path=out_path)
