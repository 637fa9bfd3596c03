"""The tracker callback trainers report to. vim_core ships file trackers; flows/ adds MLflow.

JsonlTracker writes what DVC reads: one CSV per metric group for `dvc plots`, plus metrics.jsonl,
params.json, images and artifacts. Metric names group by their prefix: "loss/total" and "loss/vq" go to
plots/<prefix>_loss.csv with columns step,total,vq; names without a slash go to the "train" group.
"""

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from vim_core.io import atomic_write_text


@runtime_checkable
class Tracker(Protocol):
    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict, step: int) -> None: ...

    def log_artifact(self, path: str | Path, name: str | None = None) -> None: ...

    def log_image(self, image: str | Path | np.ndarray, name: str) -> None: ...


class NullTracker:
    """Discards everything; for tests and non-main ranks."""

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        pass

    def log_image(self, image: str | Path | np.ndarray, name: str) -> None:
        pass


def _scalar(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def _fmt(value: float) -> str:
    return repr(value) if math.isfinite(value) else "nan"


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict:
    """Nested dicts to one level, keys joined by `sep`; trackers store params and metrics flat."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, sep, f"{name}{sep}"))
        else:
            out[name] = value
    return out


def to_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (H, W), (H, W, C) or (C, H, W) pixels as what PIL and MLflow take: (H, W) or (H, W, C)."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"log_image wants uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def save_image(image: np.ndarray | torch.Tensor, path: Path) -> None:
    """Write uint8 (H, W), (H, W, C) or (C, H, W) pixels as PNG."""
    from PIL import Image  # only needed when images are logged

    arr = to_hwc(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# Logged at a checkpoint's step before the checkpoint is saved (train/run.py): a run resumed from it
# does not log them again, so a resumed JsonlTracker keeps them.
CHECKPOINT_KEYS = ("eval/val_loss",)


class JsonlTracker:
    """Per-step metrics as metrics.jsonl and per-group CSVs that `dvc plots` reads.

    start_step > 0 (a resumed run) keeps rows logged before start_step and drops later ones, which the
    killed run logged after its last checkpoint, so every curve has each step once. At start_step itself
    it keeps the CHECKPOINT_KEYS, which the checkpoint logged before it was saved. start_step 0 starts
    the files afresh.
    """

    def __init__(
        self,
        out_dir: str | Path,
        plots_dir: str | Path | None = None,
        prefix: str = "",
        start_step: int = 0,
        default_group: str = "train",
    ):
        self.out_dir = Path(out_dir)
        self.plots_dir = Path(plots_dir) if plots_dir is not None else self.out_dir / "plots"
        self.prefix = f"{prefix}_" if prefix else ""
        self.default_group = default_group
        self.start_step = start_step
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "metrics.jsonl"
        self._columns: dict[str, list[str]] = {}
        self._truncate_jsonl()

    # ---- resume bookkeeping

    def _truncate_jsonl(self) -> None:
        kept = []
        if self.start_step > 0 and self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                try:
                    record = json.loads(line)
                    if record["step"] < self.start_step:
                        kept.append(line)
                    elif record["step"] == self.start_step:
                        saved = {k: v for k, v in record.items() if k in CHECKPOINT_KEYS}
                        if saved:
                            kept.append(json.dumps({"step": record["step"], **saved}))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill
        atomic_write_text(self.jsonl, "".join(f"{line}\n" for line in kept))

    def _csv_path(self, group: str) -> Path:
        return self.plots_dir / f"{self.prefix}{group}.csv"

    def _open_group(self, group: str) -> None:
        """First write to a group this run: keep earlier rows of a resumed run, drop the rest."""
        path = self._csv_path(group)
        header, rows = ["step"], []
        if self.start_step > 0 and path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or ["step"])
                saved = [c for c in header[1:] if f"{group}/{c}" in CHECKPOINT_KEYS]
                for row in reader:
                    try:
                        step = int(row["step"])
                    except (TypeError, ValueError):
                        continue
                    if step < self.start_step:
                        rows.append(row)
                    elif step == self.start_step and any(row.get(c) for c in saved):
                        rows.append({"step": row["step"], **{c: row[c] for c in saved}})
        self._columns[group] = header
        self._rewrite(group, rows)

    def _rewrite(self, group: str, rows: list[dict]) -> None:
        path = self._csv_path(group)
        lines = [",".join(self._columns[group])]
        lines += [",".join(row.get(c) or "" for c in self._columns[group]) for row in rows]
        atomic_write_text(path, "\n".join(lines) + "\n")

    def _read_rows(self, group: str) -> list[dict]:
        with open(self._csv_path(group), newline="") as f:
            return list(csv.DictReader(f))

    # ---- Tracker

    def log_params(self, params: dict) -> None:
        flat = {
            k: v if isinstance(v, bool | int | float | str | None) else str(v)
            for k, v in flatten(params).items()
        }
        atomic_write_text(self.out_dir / "params.json", json.dumps(flat, indent=2, sort_keys=True) + "\n")

    def log_metrics(self, metrics: dict, step: int) -> None:
        values = {k: _scalar(v) for k, v in metrics.items()}
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        groups: dict[str, dict[str, float]] = {}
        for key, value in values.items():
            group, _, column = key.partition("/") if "/" in key else (self.default_group, "", key)
            groups.setdefault(group.replace("/", "_"), {})[column.replace("/", "_").replace(",", "_")] = value
        for group, cols in groups.items():
            if group not in self._columns:
                self._open_group(group)
            new = [c for c in cols if c not in self._columns[group]]
            if new:
                # A CSV header cannot grow in place: rewrite the file once with the wider header.
                rows = self._read_rows(group)
                self._columns[group] += new
                self._rewrite(group, rows)
            row = [str(step)] + [_fmt(cols[c]) if c in cols else "" for c in self._columns[group][1:]]
            with open(self._csv_path(group), "a") as f:
                f.write(",".join(row) + "\n")

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        src = Path(path)
        dst = self.out_dir / "artifacts" / (name or src.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)

    def log_image(self, image: str | Path | np.ndarray, name: str) -> None:
        dst = self.out_dir / "images" / (name if name.endswith(".png") else f"{name}.png")
        if isinstance(image, str | Path):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, dst)
        else:
            save_image(image, dst)


class MultiTracker:
    """Fans every call out to several trackers, e.g. JsonlTracker for DVC plus MLflow."""

    def __init__(self, *trackers: Tracker):
        self.trackers = list(trackers)

    def log_params(self, params: dict) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, name)

    def log_image(self, image: str | Path | np.ndarray, name: str) -> None:
        for t in self.trackers:
            t.log_image(image, name)


class PrefixedTracker:
    """Another tracker's calls with every name under `prefix`: a second training in one stage (the
    unconditional VIM after the class-conditional one) logs to the stage's run without overwriting the
    first one's params, curves and images."""

    def __init__(self, tracker: Tracker, prefix: str):
        self.tracker, self.prefix = tracker, prefix

    def log_params(self, params: dict) -> None:
        self.tracker.log_params({self.prefix: params})

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.tracker.log_metrics({f"{self.prefix}/{k}": v for k, v in metrics.items()}, step)

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        self.tracker.log_artifact(path, f"{self.prefix}/{name or Path(path).name}")

    def log_image(self, image: str | Path | np.ndarray, name: str) -> None:
        self.tracker.log_image(image, f"{self.prefix}/{name}")
