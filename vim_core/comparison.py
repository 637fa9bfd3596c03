"""A side-by-side comparison of runs or registry versions: the metrics table and the tiled sample grids.

flows/compare.py finds the subjects in MLflow; this is the rendering, which needs no server.
"""

from dataclasses import dataclass, field

KEY_METRICS = (
    "fid_domain_val",  # the promotion's metric and guard (validation split)
    "class_accuracy_val",
    "fid_domain",
    "class_accuracy",
    "codebook_usage",
    "psnr",
    "rfid_domain",
    "val_bits_per_token",
    "isc_domain",
    "probe_accuracy",
)


@dataclass
class Subject:
    """One column of the comparison: a run, or a registry version and the runs it came from."""

    label: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    runs: list = field(default_factory=list)  # where to look for the grid, most specific first
    grid: str | None = None  # runs:/<run>/<path> of the sample grid shown


def metric_rows(subjects: list[Subject]) -> list[str]:
    """The key metrics any subject has, in KEY_METRICS order."""
    return [k for k in KEY_METRICS if any(k in s.metrics for s in subjects)]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def table_text(subjects: list[Subject]) -> str:
    """The table as aligned plain text, for the terminal."""
    rows = [["metric", *(s.label for s in subjects)]]
    rows += [[k, *(_cell(s.metrics.get(k)) for s in subjects)] for k in metric_rows(subjects)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def table_markdown(subjects: list[Subject]) -> str:
    lines = [
        "| metric | " + " | ".join(s.label for s in subjects) + " |",
        "|---|" + "---|" * len(subjects),
    ]
    for k in metric_rows(subjects):
        lines.append(f"| {k} | " + " | ".join(_cell(s.metrics.get(k)) for s in subjects) + " |")
    lines.append("")
    lines.append("| subject | run | sample grid |")
    lines.append("|---|---|---|")
    for s in subjects:
        lines.append(f"| {s.label} | `{s.run_id}` | {f'`{s.grid}`' if s.grid else 'none logged'} |")
    return "\n".join(lines) + "\n"


def side_by_side(images: list, labels: list[str]):
    """The grids scaled to one height, tiled left to right by torchvision's make_grid, labels above."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    height = max(im.height for im in images)
    width = max(round(im.width * height / im.height) for im in images)
    tiles = []
    for im in images:
        scaled = im.convert("RGB").resize((round(im.width * height / im.height), height), Image.NEAREST)
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(scaled, ((width - scaled.width) // 2, 0))
        tiles.append(torch.from_numpy(np.array(canvas)).permute(2, 0, 1))
    pad = 8
    grid = make_grid(torch.stack(tiles), nrow=len(tiles), padding=pad, pad_value=255)
    body = Image.fromarray(grid.permute(1, 2, 0).numpy())
    header = 18
    out = Image.new("RGB", (body.width, body.height + header), "white")
    out.paste(body, (0, header))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(labels):
        while len(label) > 1 and draw.textlength(label) > width:  # keep each label above its own grid
            label = label[:-1]
        draw.text((pad + i * (width + pad), 3), label, fill="black")
    return out
