"""The study report's Markdown and plots, reports/<study>.{md,png} (and <study>_curves.png for metrics
indexed by position, such as the probe over depth), written atomically beside its JSON.
"""

import json
import math
import os
from pathlib import Path

from vim_core.config.study import MetricSpec, StudySpec
from vim_core.errors import VimError
from vim_core.io import atomic_write_text
from vim_core.study.report import CHOSEN, build_report, is_number


def _fmt(stat: dict | None) -> str:
    if not stat:
        return "-"
    digits = 3 if abs(stat["mean"]) < 100 else 1  # the sd with the mean's precision
    if stat["n"] < 2:
        return f"{stat['mean']:.{digits}f} (n=1)"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f} (n={stat['n']})"


def _sci(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _seq(values: list) -> str:
    return ", ".join("-" if v is None else f"{v:g}" if is_number(v) else str(v) for v in values)


def _label(m: MetricSpec) -> str:
    arrow = {"lower": " (lower is better)", "higher": " (higher is better)", None: ""}[m.better]
    return f"{m.label or m.key}{arrow}"


def render_markdown(report: dict, spec: StudySpec) -> str:
    arms = list(report["arms"])
    paper_arms = [a for a in arms if a in report["paper"]]
    lines = [f"# {report['title']}", ""]
    if report["question"]:
        lines += [report["question"], ""]
    lines += [
        f"Study `{report['study']}` ({report['study_file']}), commit `{(report['git_commit'] or '?')[:12]}`, "
        f"{report['created']}, {report['machine']}. Each cell: mean ± sample standard deviation over seeds "
        '(n = seeds); every seed\'s value is in the JSON. "-": the arm has no such number (an '
        "unconditional VIM has no class-conditional rows).",
        "",
    ]
    if report["missing_runs"]:
        lines += [f"**Partial report: not run yet: {', '.join(report['missing_runs'])}.**", ""]
    lines += [
        "| metric | " + " | ".join(arms) + "".join(f" | paper: {a}" for a in paper_arms) + " |",
        "|---" * (1 + len(arms) + len(paper_arms)) + "|",
    ]
    for m in spec.metrics:
        row = [_label(m)] + [_fmt(report["arms"][a]["metrics"].get(m.key)) for a in arms]
        row += [str(report["paper"][a].get(m.key, "-")) for a in paper_arms]
        lines.append("| " + " | ".join(row) + " |")
    lines += _comparison_lines(report, spec)
    lines += _scaling_lines(report)
    lines += _sampling_lines(report)
    lines += _budget_lines(report)
    lines += ["", "Arms:", ""]
    for a in arms:
        ov = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in report["arms"][a]["overrides"].items()) or "none"
        lines.append(f"- `{a}`: {report['arms'][a]['description']} Overrides: {ov}.")
    if report["paper"]:
        lines += [
            "",
            "Paper figures: " + "; ".join(f"{a}: {p.get('source', '')}" for a, p in report["paper"].items()),
        ]
    for note in report["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _comparison_lines(report: dict, spec: StudySpec) -> list[str]:
    if not report["comparison"]:
        return []
    labels = {m.key: m.label or m.key for m in spec.metrics}
    lines = [
        "",
        f"Differences between arms: {report['comparison']['method']}. A verdict names the better arm when "
        "the interval excludes 0, in the metric's direction; metrics without a direction get none.",
    ]
    for pair in report["comparison"]["pairs"]:
        a, b = pair["a"], pair["b"]
        lines += [
            "",
            f"`{a}` against `{b}`:",
            "",
            f"| metric | {a} − {b} | 95% CI | verdict |",
            "|---|---|---|---|",
        ]
        for key, c in pair["metrics"].items():
            ci = c["ci_note"] if c["ci95"] is None else f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
            lines.append(f"| {labels[key]} | {c['diff']:+.3f} | {ci} | {c['verdict'] or '-'} |")
    return lines


def _scaling_lines(report: dict) -> list[str]:
    sc = report.get("scaling")
    if not sc:
        return []
    if "skipped" in sc:
        return ["", f"Scaling fit: skipped ({sc['skipped']})."]
    lines = [
        "",
        f"Scaling: `{sc['metric']}` against `{sc['x']}`, fitted per series as {sc['form']} "
        f"(x_ref = {sc['x_ref']:.3g}); {sc['method']}.",
        "",
        "| series | a | b (exponent) | floor | RMSE |",
        "|---|---|---|---|---|",
    ]
    for name, entry in sc["series"].items():
        f = entry["fit"]
        if f is None:
            lines.append(f"| {name} | fit failed | | | |")
            continue
        cell = {k: f"{f[k]:.3g} [{f['ci95'][k][0]:.3g}, {f['ci95'][k][1]:.3g}]" for k in ("a", "b", "floor")}
        lines.append(f"| {name} | {cell['a']} | {cell['b']} | {cell['floor']} | {f['rmse']:.3g} |")
    a, b = list(sc["series"])[:2]
    lines += ["", f"Measured gap {a} − {b} at each budget (Welch 95% interval where both have 2+ seeds):", ""]
    lines += ["| budget (FLOPs) | arms | gap | 95% CI |", "|---|---|---|---|"]
    for g in sc["gap"]:
        ci = "n/a (1 seed)" if g["ci"] is None else f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
        lines.append(f"| {g['x_mean']:.3g} | {' − '.join(g['arms'])} | {g['diff']:+.3f} | {ci} |")
    t = sc.get("trend")
    if t:
        ci = t["lead_change_ci95"]
        cr = t["crossing"]
        lines += [
            "",
            f"The fitted lead of `{t['leader_at_x_min']}` is {t['lead_at_x_min']:.3g} at {t['x_min']:.3g} "
            f"FLOPs and {t['lead_at_x_max']:.3g} at {t['x_max']:.3g}: a change of {t['lead_change']:+.3g} "
            f"(95% interval {'n/a' if ci is None else f'[{ci[0]:+.3g}, {ci[1]:+.3g}]'}). **Verdict: "
            f"{t['verdict']}.**",
            "",
        ]
        where = f"{cr['searched'][0]:.3g} to {cr['searched'][1]:.3g} FLOPs"
        if cr["fitted_at"] is None:
            lines.append(f"The fitted curves do not cross from {where}.")
        else:
            extra = " (an extrapolation beyond the largest budget)" if cr["extrapolated"] else ""
            lines.append(f"The fitted curves cross at {cr['fitted_at']:.3g} FLOPs{extra}.")
            later = cr.get("all_fitted", [])[1:]
            if later:
                lines[-1] += " They cross again at " + ", ".join(f"{c:.3g}" for c in later) + " FLOPs."
        if cr["bootstrap_share"] is not None:
            bci = cr["bootstrap_ci95"]
            lines[-1] += (
                f" {cr['bootstrap_share']:.0%} of the bootstrap fit pairs cross in that span"
                + ("" if bci is None else f", at [{bci[0]:.3g}, {bci[1]:.3g}] FLOPs (95%)")
                + "."
            )
        if t.get("fitted_at_budgets"):
            lines += ["", f"Fitted {a} − {b} and {a} / {b} at each budget (95% bootstrap intervals):", ""]
            lines += [
                "| budget (FLOPs) | fitted gap | 95% CI | fitted ratio | 95% CI |",
                "|---|---|---|---|---|",
            ]
            for f in t["fitted_at_budgets"]:
                gci, rci = f["gap_ci95"], f["ratio_ci95"]
                ratio = "n/a" if f["ratio"] is None else f"{f['ratio']:.3g}"
                lines.append(
                    f"| {f['x']:.3g} | {f['gap']:+.3g} | [{gci[0]:+.3g}, {gci[1]:+.3g}] | {ratio} | "
                    + ("n/a" if rci is None else f"[{rci[0]:.3g}, {rci[1]:.3g}]")
                    + " |"
                )
    return lines


def _sampling_lines(report: dict) -> list[str]:
    rows = [(a, d["sampling"]) for a, d in report["arms"].items() if d["sampling"]["per_seed"]]
    if not rows:
        return []
    keys = [k for k in CHOSEN if any(k in s["per_seed"] for _, s in rows)]
    lines = [
        "",
        "Sampling chosen by each run's own search (one value per seed, in seed order):",
        "",
        "| arm | seeds | " + " | ".join(keys) + " | chosen on |",
        "|---" * (3 + len(keys)) + "|",
    ]
    for a, s in rows:
        cells = [_seq(s["per_seed"].get(k, [])) or "-" for k in keys]
        on = "; ".join(s["chosen_on"]) or "-"
        lines.append(f"| {a} | {report['arms'][a]['seeds']} | " + " | ".join(cells) + f" | {on} |")
    return lines


def _budget_lines(report: dict) -> list[str]:
    lines = [
        "",
        "Training budget (mean over seeds; FLOPs of gradient steps counted by torch's FlopCounterMode):",
        "",
    ]
    lines += [
        "| arm | seeds | tokenizer FLOPs | tokenizer steps | VIM FLOPs | VIM steps |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for a, d in report["arms"].items():
        b = d["budget"]
        lines.append(
            f"| {a} | {d['seeds']} | {_sci(b.get('tokenizer_train_flops', {}).get('mean'))} | "
            f"{_sci(b.get('tokenizer_steps', {}).get('mean'))} | "
            f"{_sci(b.get('transformer_train_flops', {}).get('mean'))} | "
            f"{_sci(b.get('transformer_steps', {}).get('mean'))} |"
        )
        if d.get("tokenizer_flops_definition"):
            notes.append(f"`{a}` tokenizer FLOPs: {d['tokenizer_flops_definition']}.")
    return lines + (["", *notes] if notes else [])


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_plot(report: dict, spec: StudySpec, path: Path) -> bool:
    """One panel per metric: each arm's seeds as dots and their mean as a bar; False when nothing to plot."""
    shown = [m for m in spec.metrics if any(m.key in a["metrics"] for a in report["arms"].values())]
    if not shown:  # a partial report before any run finished
        return False
    plt = _pyplot()
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    arms = list(report["arms"])
    for ax, m in zip(axes.flat, shown, strict=False):
        for i, arm in enumerate(arms):
            stat = report["arms"][arm]["metrics"].get(m.key)
            if stat:
                ax.bar(i, stat["mean"], color=f"C{i}", alpha=0.5)
                ax.scatter([i] * len(stat["values"]), stat["values"], color=f"C{i}", s=12, zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=7)
        arrow = {"lower": " ↓", "higher": " ↑", None: ""}[m.better]
        ax.set_title((m.label or m.key) + arrow, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(report["title"], fontsize=9)
    _save_figure(fig, path)
    return True


def render_scaling(report: dict, spec: StudySpec, path: Path) -> bool:
    """One panel per metric against the compute axis (log scale): seeds as dots, means joined, the fit drawn."""
    sc = report.get("scaling")
    if not sc or "series" not in sc:
        return False
    from vim_core.study.scaling import power_floor

    shown = [m for m in spec.metrics if m.key != "train_seconds"][:8]
    plt = _pyplot()
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, m in zip(axes.flat, shown, strict=False):
        for i, (name, arms) in enumerate(spec.scaling.series.items()):
            pts = [
                (report["arms"][a]["scaling_x"], report["arms"][a]["metrics"].get(m.key))
                for a in arms
                if a in report["arms"] and "scaling_x" in report["arms"][a]
            ]
            pts = [(x, y) for x, y in pts if y]
            if not pts:
                continue
            for x, y in pts:
                ax.scatter(x["values"], y["values"], color=f"C{i}", s=12, zorder=3)
            ax.plot(
                [x["mean"] for x, _ in pts], [y["mean"] for _, y in pts], color=f"C{i}", alpha=0.5, label=name
            )
            fit = (sc["series"].get(name) or {}).get("fit")
            if m.key == sc["metric"] and fit:
                import numpy as np

                grid = np.geomspace(pts[0][0]["mean"] / 1.5, pts[-1][0]["mean"] * 1.5, 100)
                ax.plot(
                    grid,
                    power_floor(grid, fit["a"], fit["b"], fit["floor"], sc["x_ref"]),
                    "--",
                    color=f"C{i}",
                    label=f"{name} fit (b={fit['b']:.2g}, floor={fit['floor']:.2g})",
                )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # only the decades are labelled
        if m.key == sc["metric"]:
            ax.set_yscale("log")  # a power law towards a floor reads best on log-log axes
        arrow = {"lower": " ↓", "higher": " ↑", None: ""}[m.better]
        ax.set_title((m.label or m.key) + arrow, fontsize=8)
        ax.set_xlabel(spec.scaling.x.label or spec.scaling.x.key, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(report["title"] + " (dots: seeds; line: mean; dashed: fit)", fontsize=9)
    _save_figure(fig, path)
    return True


def curves(spec: StudySpec) -> dict[str, list[tuple[int, MetricSpec]]]:
    """Metrics indexed by position (`probe_test_accuracy_by_block.2`), grouped into curves by their prefix."""
    out: dict[str, list[tuple[int, MetricSpec]]] = {}
    for m in spec.metrics:
        prefix, _, index = m.key.rpartition(".")
        if prefix and index.isdigit():
            out.setdefault(prefix, []).append((int(index), m))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items() if len(v) > 1}


def render_curves(report: dict, spec: StudySpec, path: Path) -> bool:
    """One panel per curve (the probe over depth): each arm's mean with its seeds' range, per index."""
    groups = curves(spec)
    if not groups:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, (prefix, points) in zip(axes.flat, groups.items(), strict=True):
        for i, (arm, data) in enumerate(report["arms"].items()):
            stats = [(x, data["metrics"].get(m.key)) for x, m in points]
            stats = [(x, s) for x, s in stats if s]
            if not stats:
                continue
            xs = [x for x, _ in stats]
            ax.plot(xs, [s["mean"] for _, s in stats], marker="o", color=f"C{i}", label=arm)
            lo = [min(s["values"]) for _, s in stats]
            hi = [max(s["values"]) for _, s in stats]
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
        ax.set_xticks([x for x, _ in points])
        ax.set_xlabel("index (0-based)", fontsize=8)
        ax.set_title(prefix, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(report["title"] + " (line: mean over seeds; band: the seeds' range)", fontsize=9)
    _save_figure(fig, path)
    return True


def check_replaceable(out_dir: Path, name: str, replace_old: bool) -> None:
    """Refuse to overwrite a committed report of the old protocol unless asked (--replace-old)."""
    path = out_dir / f"{name}.json"
    if replace_old or not path.exists():
        return
    try:
        protocol = json.loads(path.read_text()).get("protocol")
    except (ValueError, AttributeError):
        protocol = None
    if protocol is None or str(protocol).startswith("old"):
        raise VimError(
            f"{path} is a report of the old protocol ({protocol or 'unmarked'}); pass --replace-old to "
            "overwrite it, or --out-dir to write elsewhere"
        )


def write_report(
    spec: StudySpec,
    exps: dict[str, dict],
    study_file: str,
    out_dir: Path,
    partial: bool = False,
    commit: str | None = None,
) -> dict:
    report = build_report(spec, exps, study_file, partial, commit)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{spec.name}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / f"{spec.name}.md", render_markdown(report, spec))
    if not render_scaling(report, spec, out_dir / f"{spec.name}.png"):
        render_plot(report, spec, out_dir / f"{spec.name}.png")
    render_curves(report, spec, out_dir / f"{spec.name}_curves.png")
    return report
