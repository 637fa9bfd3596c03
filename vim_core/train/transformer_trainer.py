"""Pretrain VIM on token shards: next-token prediction in raster order, optionally class-conditional."""

import contextlib
import hashlib
import logging
import math
from pathlib import Path

import torch

from vim_core.config.pipeline import TransformerSection
from vim_core.config.transformer import TransformerModelConfig
from vim_core.data.shards import iter_shards, read_manifest
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
from vim_core.train.tracking import PrefixedTracker, Tracker
from vim_core.transformer.export import save_transformer
from vim_core.transformer.gpt import VIM

log = logging.getLogger(__name__)

TransformerRun = run.TrainRun  # the name callers know


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


def transformer_fingerprint(
    cfg: TransformerSection, tokens_manifest: dict, seed: int, init_from: VIM | None = None
) -> str:
    """Checkpoints resume only into a run with the same config, tokens, seed, starting weights and
    model/trainer code."""
    spec = {
        "code": code_digest("transformer", "layers.py", "train", "data/shards.py"),
        "model": model_config_for(cfg, tokens_manifest).model_dump(mode="json"),
        "train": cfg.train.model_dump(
            mode="json", exclude={"resume", "processes", "select"}
        ),  # N ranks resume on M
        "tokens": [s["sha256"] for sp in tokens_manifest["splits"].values() for s in sp["shards"]],
        "seed": seed,
    }
    if init_from is not None:
        spec["init_from"] = weights_digest(init_from)
    return run.fingerprint(spec)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's weights, in state-dict order: what a run that starts from them resumes on."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _loss(net, x: torch.Tensor, y: torch.Tensor | None, bf16: bool) -> torch.Tensor:
    with autocast_context(x.device, bf16):
        _, loss = net(x[:, :-1], y, targets=x)
    return loss


def step_flops(cfg: TransformerSection, ctx: run.RunContext, model: VIM) -> list[tuple[int, int]]:
    """FLOPs of one training step on this rank (forward + backward), counted on a copy."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.vocab_size, (ctx.local_batch, model.seq_len), generator=g).to(ctx.device)
    y = None
    if model.num_classes > 0:
        y = torch.randint(0, model.num_classes, (ctx.local_batch,), generator=g).to(ctx.device)
    m = flops.frozen_copy(model).train()
    return [(0, flops.count_flops(lambda: _loss(m, x, y, cfg.train.bf16).backward()))]


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
    """Mean next-token NLL over a split, in bits (the paper's validation metric); limit: first N sequences."""
    was_training = model.training
    model.eval()
    total, count, sequences = 0.0, 0, 0
    for tokens, labels in iter_shards(tokens_dir, split):
        for lo in range(0, len(tokens), batch_size):
            if limit is not None and sequences >= limit:
                break
            hi = lo + batch_size if limit is None else min(lo + batch_size, lo + limit - sequences)
            x = torch.from_numpy(tokens[lo:hi].astype("int64")).to(device)
            y = torch.from_numpy(labels[lo:hi]).to(device) if conditional else None
            _, loss = model(x[:, :-1], y, targets=x)
            total += float(loss) * x.numel()
            count += x.numel()
            sequences += len(x)
        if limit is not None and sequences >= limit:
            break  # the limit ends the whole pass, not only the current shard
    model.train(was_training)
    return total / max(count, 1) / math.log(2)


def train_transformer(
    cfg: TransformerSection,
    seed: int = 0,
    tracker: Tracker | None = None,
    plots_dir: str | Path | None = None,
    init_from: VIM | None = None,
) -> run.TrainRun:
    """Train, checkpoint, resume, measure validation bits/token and export. Every torchrun rank calls this.

    `init_from`: the class-conditional VIM an unconditional one starts from (VIM.start_from_conditional);
    every rank holds the same one, as the ranks' best-val choices agree.
    """
    t = cfg.train
    manifest = read_manifest(cfg.tokens_dir)
    n_train = manifest["splits"]["train"]["count"]
    ctx = run.start_run(t, "transformer", n_train, cfg.tokens_dir)
    device = ctx.device  # cuda:LOCAL_RANK under torchrun on GPUs

    set_seed(seed)
    model = build_vim(cfg, manifest)
    if init_from is not None:
        model.start_from_conditional(init_from)
    model = model.to(device)
    conditional = model.num_classes > 0
    budget = flops.resolve_budget(t, "transformer", step_flops(cfg, ctx, model), ctx.info.world_size)
    opt = model.configure_optimizers(t.weight_decay, t.schedule.peak_lr, t.betas)  # fused on CUDA
    sched = make_scheduler(opt, t.schedule, budget.steps)
    modules: dict = {"model": model}
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    if ema is not None:
        modules["ema"] = ema
    best = run.BestVal(model)
    modules["best_val"] = best
    val_split = run.val_split(manifest)
    fp = transformer_fingerprint(cfg, manifest, seed, init_from)
    ckpt_dir = Path(cfg.checkpoint_dir) / fp
    start, _ = maybe_resume(ckpt_dir, t.resume, modules, {"model": opt}, {"model": sched})
    tracker = run.open_tracker(ctx, tracker, cfg.out_dir, plots_dir, "transformer", start)
    tracker.log_params(
        {
            "transformer": cfg.model_dump(mode="json"),
            "seed": seed,
            "fingerprint": fp,
            "world_size": ctx.info.world_size,
            "params": model.num_params(),
            "steps": budget.steps,
        }
    )
    net = maybe_compile(vdist.wrap_ddp(model, ctx.info), t.compile)
    batches = run.train_batches(ctx, cfg.tokens_dir, t.batch_size, n_train, seed, start)

    def step_fn(step: int, batch) -> run.StepResult:
        tokens, labels = batch
        x = torch.from_numpy(tokens.astype("int64")).to(device, non_blocking=True)
        y = torch.from_numpy(labels).to(device) if conditional else None
        loss = _loss(net, x, y, t.bf16)
        check_finite({"loss": loss}, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad(model, t.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        losses = {"train": loss.detach(), "train_bits_per_token": loss.detach() / math.log(2)}
        return run.StepResult(losses, {"train/grad_norm": grad_norm, "train/lr": sched.get_last_lr()[0]})

    save = run.checkpointer(ckpt_dir, modules, {"model": opt}, {"model": sched}, t.keep_checkpoints)
    if val_split is not None:

        def val_loss(m: VIM) -> float:
            """Cost per checkpoint: one no-grad forward over val_examples (256) sequences, ~1.3 steps at batch 64."""
            return bits_per_token(m, cfg.tokens_dir, val_split, device, conditional, limit=t.val_examples)

        exported = (
            (lambda: ema.applied_to(model)) if ema is not None else (lambda: contextlib.nullcontext(model))
        )
        save = run.validating_checkpointer(save, best, exported, val_loss, tracker)
    model.train()
    label = "pretrain_transformer" if init_from is None else "pretrain_transformer (unconditional copy)"
    step_seconds: list[float] = []
    seconds = run.run_steps(ctx, t, budget.steps, start, batches, step_fn, save, tracker, label, step_seconds)
    if ema is not None:
        ema.copy_to(model)
    selected = run.select_weights(t.select, best, model)
    model.eval()
    steps_run = budget.steps - start
    metrics = {
        **budget.metrics(ctx.info.world_size),
        "resumed_from": start,
        "train_seconds": round(seconds, 2),
        **run.step_time_metrics(step_seconds, budget.phases, start),
        "autocast": "bf16" if uses_bf16(device, cfg.train.bf16) else "fp32",  # what ran (train.bf16)
        "world_size": ctx.info.world_size,
        "fingerprint": fp,
        "params": model.num_params(),
        "tokens_per_second": round(steps_run * t.batch_size * model.seq_len / max(seconds, 1e-9), 1),
        "selected": selected,
        **best.metrics(),
        "val_loss_definition": f"next-token NLL in bits/token over the first {t.val_examples} val sequences, "
        "at every checkpoint",
    }
    out_path = Path(cfg.out_dir) / "transformer.safetensors"
    if ctx.info.is_main:
        metrics["val_bits_per_token"] = round(
            bits_per_token(model, cfg.tokens_dir, "test", device, conditional), 4
        )
        metrics["val_definition"] = "mean next-token NLL in bits over every token of the test split"
        tracker.log_metrics({"eval/val_bits_per_token": metrics["val_bits_per_token"]}, budget.steps)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if plots_dir is not None:
            best.write_csv(Path(plots_dir) / "transformer_val_loss.csv")
        save_transformer(
            model,
            str(out_path),
            extra={
                "tokenizer_sha256": manifest.get("tokenizer_sha256"),
                "class_names": manifest.get("class_names"),
            },
        )
    vdist.barrier()
    return run.TrainRun(model=model, metrics=metrics, model_path=out_path)


def train_with_uncond_copy(
    cfg: TransformerSection,
    seed: int = 0,
    tracker: Tracker | None = None,
    plots_dir: str | Path | None = None,
) -> run.TrainRun:
    """train_transformer, then the unconditional copy when cfg.uncond is set (TransformerSection.
    uncond_section): it starts from the VIM just trained and keeps its curves in its own out_dir/plots.
    Returns the VIM's run, its metrics holding the copy's under "uncond"."""
    main = train_transformer(cfg, seed=seed, tracker=tracker, plots_dir=plots_dir)
    section = cfg.uncond_section()
    if section is None:
        return main
    inner = PrefixedTracker(tracker, "uncond") if tracker is not None else None
    plots = None if plots_dir is None else f"{section.out_dir}/plots"
    copy = train_transformer(section, seed=seed, tracker=inner, plots_dir=plots, init_from=main.model)
    main.metrics["uncond"] = copy.metrics
    return main
