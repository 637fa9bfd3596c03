"""Atomic, checksummed training checkpoints that resume a run exactly where it stopped.

Layout of one checkpoint (the directory appears under its final name only once complete):
    ckpt_dir/step-00000123/
        model.safetensors      one file per named module (model, ema, discriminator, ...)
        state.pt               optimizers, schedulers, step, per-rank RNG states, `extra`;
                               plain types only, so it loads with torch.load(weights_only=True)
        meta.json              step and sha256 + size of every file; written last
`step` counts completed optimizer steps: a run resumed from step-00000123 next runs step 123 (0-based).
"""

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import safetensors
import torch
from safetensors.torch import load_file, save_file

from vim_core.errors import VimError
from vim_core.io import atomic_dir, sha256_file
from vim_core.train import distributed as vdist

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, /) -> Any: ...


PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def code_digest(*parts: str) -> str:
    """sha256 of the vim_core sources (files or packages, relative to vim_core/) that give a run meaning.

    Part of a run's fingerprint: a checkpoint written by other model or trainer code is not resumed, so
    `dvc repro` after a code change retrains instead of exporting the old weights.
    """
    h = hashlib.sha256()
    for part in parts:
        path = PACKAGE_ROOT / part
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(PACKAGE_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------- RNG state as plain types


def rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and CUDA), as types weights_only can load."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- plain-type check for state.pt

_PLAIN = (bool, int, float, str, type(None), torch.Tensor)


def _check_plain(obj: object, where: str) -> None:
    """Fail at save time, not at resume time, when something would not load with weights_only=True."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise VimError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}; use str or int")
            _check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise VimError(
        f"checkpoint {where} is a {type(obj).__name__}; only tensors, numbers, strings, lists and dicts "
        "can be saved (convert numpy values with .tolist() or torch.from_numpy)"
    )


# ---------------------------------------------------------------- module weights


def _module_state(obj: Stateful) -> dict[str, torch.Tensor]:
    """A flat CPU state dict safetensors accepts: contiguous, and tied tensors stored once each."""
    target = vdist.unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in target.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise VimError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
        t = value.detach()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share memory (tied weights, views into one buffer);
        # a private copy of each loads back the same, also into tied parameters.
        shared = storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()
        if t.numel():
            seen.add(storage.data_ptr())
        t = t.to("cpu")
        out[name] = t.clone() if shared or not t.is_contiguous() else t
    return out


def _load_module(obj: Stateful, path: Path) -> None:
    try:
        state = load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise VimError(
            f"{path}: unreadable weights ({_one_line(err)}); the file is truncated or corrupt"
        ) from None
    target = vdist.unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
    try:
        target.load_state_dict(state)  # strict: a missing or unexpected key raises
    except (RuntimeError, KeyError, ValueError) as err:
        raise VimError(f"{path}: weights do not fit the {type(target).__name__} ({_one_line(err)})") from None


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- save


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    modules: dict[str, Stateful],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    extra: dict | None = None,
    keep_last: int | None = 2,
    write: bool | None = None,
) -> Path | None:
    """Write ckpt_dir/step-XXXXXXXX atomically and prune all but the newest `keep_last`; returns its path.

    Under DDP call it on every rank: it gathers each rank's RNG state, then only rank 0 (or `write=True`)
    writes. Non-writing ranks return None. A failed write raises VimError on every rank.
    """
    if step < 0:
        raise VimError(f"checkpoint step must be >= 0, got {step}")
    for name in modules:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name == "state":
            raise VimError(f"checkpoint module name {name!r} must be a plain file stem other than 'state'")
    _check_plain(extra or {}, "extra")  # on every rank, before the collective, so a bad value cannot hang DDP
    rngs = vdist.all_gather_objects(rng_state())
    if write is None:
        write = vdist.is_main()
    final, failed = None, None
    if write:
        state = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "optimizers": {k: v.state_dict() for k, v in (optimizers or {}).items()},
            "schedulers": {k: v.state_dict() for k, v in (schedulers or {}).items()},
            "rng": rngs,
            "extra": extra or {},
        }
        _check_plain(state, "state")
        try:
            final = _write_atomic(Path(ckpt_dir), step, modules, state)
            if keep_last:
                prune_checkpoints(ckpt_dir, keep_last)
        except VimError as err:
            failed = err
    # In place of a barrier: every rank learns whether the write failed, so a full disk on rank 0 stops
    # all ranks at once instead of leaving the others waiting here for the process group's timeout.
    causes = [c for c in vdist.all_gather_objects(None if failed is None else str(failed)) if c]
    if failed is not None:
        raise failed
    if causes:
        raise VimError(f"another rank could not save the checkpoint: {causes[0]}")
    return final


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind a write failure: safetensors and torch.save wrap it (or only quote it)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        if "os error 28" in str(err) or "No space left on device" in str(err):  # safetensors' Rust text
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        err = err.__cause__ or err.__context__
    return None


def _write_atomic(ckpt_dir: Path, step: int, modules: dict[str, Stateful], state: dict) -> Path:
    """_write_files, with an I/O failure (a full disk above all) as one line; the temp dir is gone by then."""
    try:
        return _write_files(ckpt_dir, step, modules, state)
    except (OSError, RuntimeError, safetensors.SafetensorError) as err:
        cause = _os_error(err)
        if cause is None:
            raise
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VimError(
                f"{ckpt_dir}: checkpoint write failed, no space left on device (step {step} not saved; "
                "the previous checkpoints are intact: free space and rerun to resume from the newest)"
            ) from None
        raise VimError(
            f"{ckpt_dir}: checkpoint write failed ({cause.strerror or _one_line(cause)}); step {step} not saved"
        ) from None


def _write_files(ckpt_dir: Path, step: int, modules: dict[str, Stateful], state: dict) -> Path:
    final = ckpt_dir / step_dir_name(step)
    # A temp name of its own per save, which prune_checkpoints sweeps when a crash leaves it behind;
    # durable: every file and the directory are on disk before the step's name appears.
    tmp_name = f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with atomic_dir(final, tmp_name=tmp_name, durable=True) as tmp:
        files: dict[str, dict] = {}
        for name, module in modules.items():
            path = tmp / f"{name}.safetensors"
            save_file(_module_state(module), str(path), metadata={"step": str(step), "module": name})
            files[path.name] = {}
        # Through a Python file, so a failed write leaves its OSError (ENOSPC) behind torch's RuntimeError.
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
        files[STATE_FILE] = {}
        mode = (tmp / STATE_FILE).stat().st_mode & 0o777  # safetensors writes 0600; match torch.save's umask
        for fname in files:
            os.chmod(tmp / fname, mode)
            files[fname] = {"sha256": sha256_file(tmp / fname), "bytes": (tmp / fname).stat().st_size}
        meta = {"format": FORMAT_VERSION, "step": int(step), "files": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return final


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every final-named checkpoint directory, oldest first; complete or not."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; also sweep temp dirs left by a crash mid-save."""
    for _, path in list_checkpoints(ckpt_dir)[:-keep_last]:
        # Renamed aside first (atomic): a kill mid-delete leaves a .old-step- dir that the next prune
        # sweeps, never a half-deleted directory under a step's name.
        aside = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    for child in Path(ckpt_dir).iterdir():
        if child.name.startswith((".tmp-step-", ".old-step-")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------- find and verify


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise VimError(f"{meta_path}: missing; the checkpoint is incomplete (interrupted save?)")
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["step"])
        dict(meta["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise VimError(f"{meta_path}: corrupt checkpoint metadata ({_one_line(err)})") from None
    return meta


def verify_checkpoint(path: str | Path, checksums: bool = True) -> dict:
    """Raise VimError naming the first missing, truncated or altered file; return the metadata."""
    path = Path(path)
    meta = read_meta(path)
    for fname, info in meta["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise VimError(f"{fpath}: missing from the checkpoint")
        size = fpath.stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise VimError(
                f"{fpath}: {size} bytes, expected {info['bytes']}; the file is truncated or corrupt"
            )
        if checksums and sha256_file(fpath) != info.get("sha256"):
            raise VimError(f"{fpath}: sha256 does not match meta.json; the file is corrupt")
    return meta


def latest_checkpoint(ckpt_dir: str | Path, checksums: bool = True) -> Path | None:
    """The newest complete checkpoint (metadata present, files intact); broken ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            verify_checkpoint(path, checksums=checksums)
        except VimError as err:
            log.warning("skipping broken checkpoint: %s", err)
            continue
        return path
    return None


def checkpoint_step(path: str | Path) -> int:
    return int(read_meta(path)["step"])


# ---------------------------------------------------------------- load


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip/pickle; all mean the same here
        raise VimError(f"{path}: unreadable ({_one_line(err)}); the file is truncated or corrupt") from None
    if not isinstance(state, dict) or "step" not in state:
        raise VimError(f"{path}: not a vim training state (no 'step' entry)")
    return state


def load_checkpoint(
    path: str | Path,
    modules: dict[str, Stateful],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    restore_rng: bool = True,
    checksums: bool = True,
) -> dict:
    """Load weights, optimizer/scheduler states and this rank's RNG state; return the saved `extra`.

    Pass only the modules you need (e.g. just {"ema": model} for evaluation). Any damage raises VimError.
    """
    path = Path(path)
    meta = verify_checkpoint(path, checksums=checksums)
    for name in modules:
        if f"{name}.safetensors" not in meta["files"]:
            have = sorted(f.removesuffix(".safetensors") for f in meta["files"] if f.endswith(".safetensors"))
            raise VimError(f"{path}: no weights named {name!r} in this checkpoint (it has {', '.join(have)})")
    state = _load_state(path / STATE_FILE)
    for kind, wanted in (("optimizers", optimizers or {}), ("schedulers", schedulers or {})):
        missing = sorted(set(wanted) - set(state.get(kind, {})))
        if missing:
            raise VimError(f"{path / STATE_FILE}: no {kind} state for {', '.join(missing)}")
    for name, module in modules.items():
        _load_module(module, path / f"{name}.safetensors")
    for name, opt in (optimizers or {}).items():
        try:
            opt.load_state_dict(state["optimizers"][name])
        except (ValueError, KeyError, RuntimeError) as err:
            raise VimError(
                f"{path / STATE_FILE}: optimizer {name!r} does not fit ({_one_line(err)})"
            ) from None
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(state["schedulers"][name])
    if restore_rng:
        rngs = state["rng"]
        me = vdist.rank()
        if len(rngs) != vdist.world_size():
            log.warning(
                "%s was saved by %d ranks, this run has %d: every rank takes rank 0's RNG state",
                path,
                len(rngs),
                vdist.world_size(),
            )
            me = 0
        set_rng_state(rngs[me])
    return state["extra"]


def maybe_resume(
    ckpt_dir: str | Path,
    mode: Literal["auto", "never"],
    modules: dict[str, Stateful],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
) -> tuple[int, dict]:
    """Return (start_step, extra). "auto" loads the newest complete checkpoint if any; "never" starts at 0
    and deletes checkpoints already in ckpt_dir, so a later step of an old run is never mistaken for this one.
    """
    if mode == "never":
        if vdist.is_main():
            old = list_checkpoints(ckpt_dir)
            if old:
                log.warning("resume=never: deleting %d old checkpoint(s) in %s", len(old), ckpt_dir)
            for _, path in old:
                shutil.rmtree(path)
        vdist.barrier()
        return 0, {}
    if mode != "auto":
        raise VimError(f"resume must be 'auto' or 'never', got {mode!r}")
    # Rank 0 picks, so every rank resumes from the same checkpoint even if one is damaged mid-read.
    found = latest_checkpoint(ckpt_dir) if vdist.is_main() else None
    found = vdist.broadcast_object(None if found is None else str(found))
    if found is None:
        return 0, {}
    extra = load_checkpoint(found, modules, optimizers, schedulers, checksums=False)
    step = checkpoint_step(found)
    log.info("resumed from %s (step %d)", found, step)
    return step, extra
