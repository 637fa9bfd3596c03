"""Compare MLflow runs or registry versions side by side: their key metrics and their sample grids.

    python -m flows.compare RUN_ID RUN_ID ...               # runs (a pipeline run, or one of its stages)
    python -m flows.compare models:/vim/3 vim@champion
    python -m flows.compare --champion                      # the registry's champion and challenger

Prints the metrics table, and writes it as Markdown (comparison.md) beside a side-by-side PNG of the
subjects' sample grids (comparison.png) into --out. A registry version's metrics are the eval metrics
its tags carry (the ones the promotion decided on), completed from the runs of its pipeline; a run's are
its own, completed from its pipeline's stage runs (val bits/token comes from pretrain_transformer).
"""

import argparse
import io
import logging
import re
import sys
import tempfile
from pathlib import Path

from flows.mlflow_run import check_reachable, client
from flows.registry import CHALLENGER, CHAMPION, METRIC_TAG, MODEL_NAME, PIPELINE_TAG, RUN_TAG, finite_number
from vim_core.comparison import Subject, side_by_side, table_markdown, table_text
from vim_core.errors import VimError
from vim_core.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger("vim.compare")

# The evaluate stage's numbers win over a training stage's of the same name (codebook_usage, psnr).
STAGE_ORDER = (
    "evaluate",
    "evaluate_tokenizer",
    "pretrain_transformer",
    "train_tokenizer",
    "tokenize_dataset",
    "train_classifier",
    "prepare_data",
)
# The sample grid to show, first found: the evaluate stage's class-conditional samples, then any grid.
GRIDS = ("images/samples_per_class.png", "images/samples_uncond.png", "images/reconstructions.png")
MD_NAME, PNG_NAME = "comparison.md", "comparison.png"
COMPARISON_TAG = "vim.comparison"
_VERSION = re.compile(r"^(?:models:/)?(?P<name>[^/@\s]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def _get_run(c, run_id: str, what: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id)
    except MlflowException:
        raise VimError(f"{what}: no such MLflow run") from None


def _related_runs(c, run) -> list:
    """The run, then its pipeline's stage runs (evaluate first): children, or siblings under its parent."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    exp = [run.info.experiment_id]
    found = {run.info.run_id: run}
    parents = [run.info.run_id]
    parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if parent:
        parents.append(parent)
    for pid in parents:
        for child in c.search_runs(exp, filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{pid}'"):
            found.setdefault(child.info.run_id, child)

    def rank(r) -> tuple[int, int]:
        stage = r.data.tags.get("vim.stage", "")
        own = 0 if r.info.run_id == run.info.run_id else 1
        return own, STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)

    return sorted(found.values(), key=rank)


def _fill(metrics: dict[str, float], runs) -> dict[str, float]:
    for r in runs:
        for key, value in r.data.metrics.items():
            if finite_number(value) is not None:
                metrics.setdefault(key, float(value))
    return metrics


def _version(c, ref: str, name: str, version: str | None, alias: str | None):
    from mlflow.exceptions import MlflowException

    try:
        if alias:
            return c.get_model_version_by_alias(name, alias)
        return c.get_model_version(name, version)
    except MlflowException:
        raise VimError(f"{ref}: no such registered model version") from None


def resolve(c, ref: str) -> Subject:
    """A run id, `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `NAME@ALIAS` as a Subject."""
    m = _VERSION.match(ref)
    if m and (m["version"] or m["alias"]) and (ref.startswith("models:/") or m["alias"]):
        mv = _version(c, ref, m["name"], m["version"], m["alias"])
        label = f"{mv.name} v{mv.version}" + (f" ({m['alias']})" if m["alias"] else "")
        metrics = {
            k.removeprefix(METRIC_TAG): v
            for k, raw in mv.tags.items()
            if k.startswith(METRIC_TAG) and (v := finite_number(raw)) is not None
        }
        # The version's own run (where its model was logged), the run that registered it, its pipeline.
        runs = []
        for rid in (mv.run_id, mv.tags.get(RUN_TAG), mv.tags.get(PIPELINE_TAG)):
            if rid and rid not in {r.info.run_id for r in runs}:
                for r in _related_runs(c, _get_run(c, rid, ref)):
                    if r.info.run_id not in {x.info.run_id for x in runs}:
                        runs.append(r)
        return Subject(label, mv.run_id, _fill(metrics, runs), runs)
    if ref.startswith("models:/"):
        raise VimError(f"{ref}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    run = _get_run(c, ref, ref)
    runs = _related_runs(c, run)
    label = f"{run.info.run_name or 'run'} {ref[:8]}"
    return Subject(label, ref, _fill({}, runs), runs)


def champion_refs(name: str = MODEL_NAME) -> list[str]:
    return [f"models:/{name}@{CHAMPION}", f"models:/{name}@{CHALLENGER}"]


# ---- the grids


def _find_grid(c, subject: Subject) -> tuple[str, str] | None:
    """(run id, artifact path) of the subject's sample grid, the first of GRIDS found in its runs."""
    for path in GRIDS:
        folder = path.rsplit("/", 1)[0]
        for r in subject.runs:
            if path in {f.path for f in c.list_artifacts(r.info.run_id, folder)}:
                return r.info.run_id, path
    return None


def grids_png(c, subjects: list[Subject]) -> bytes | None:
    """The side-by-side PNG of the subjects that logged a grid (None when none did); sets subject.grid."""
    from PIL import Image

    images, labels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, s in enumerate(subjects):
            found = _find_grid(c, s)
            if found is None:
                log.warning("%s logged no sample grid (%s)", s.label, ", ".join(GRIDS))
                continue
            run_id, path = found
            s.grid = f"runs:/{run_id}/{path}"
            local = c.download_artifacts(run_id, path, str(Path(tmp) / str(i)))
            with Image.open(local) as im:
                images.append(im.copy())
            labels.append(s.label)
    if not images:
        return None
    buf = io.BytesIO()
    side_by_side(images, labels).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ---- the whole


def compare(refs: list[str], out_dir: str | Path) -> dict:
    """Resolve `refs`, write out_dir/comparison.md and .png (atomically); returns what was written."""
    if len(refs) < 2:
        raise VimError(f"compare needs two or more runs or model versions, got {len(refs)}")
    check_reachable()
    c = client()
    subjects = [resolve(c, ref) for ref in refs]
    png = grids_png(c, subjects)
    out = Path(out_dir)
    files = {"md": str(out / MD_NAME), "png": str(out / PNG_NAME) if png else None}
    text = table_markdown(subjects)
    if png:
        text += f"\n![sample grids]({PNG_NAME})\n"
        atomic_write_bytes(files["png"], png)
    atomic_write_text(files["md"], text)
    return {"subjects": subjects, "table": table_text(subjects), "files": files}


def attach_to_version(decision: dict) -> dict | None:
    """After a promotion (registry.compare_and_promote's decision): compare the champion it faced with the
    challenger, log comparison.md and .png as artifacts of the challenger version's run (where its model
    was logged) under comparison/, and point the challenger version at them (tag and description).
    Returns compare()'s result, or None when there was no earlier champion to compare with."""
    name, before, challenger = decision["model"], decision["champion_before"], decision["challenger"]
    if not before or not challenger or before == challenger:
        log.info("no earlier champion to compare the challenger with")
        return None
    c = client()
    run_id = c.get_model_version(name, challenger).run_id
    refs = [f"models:/{name}/{before}", f"models:/{name}/{challenger}"]
    with tempfile.TemporaryDirectory() as tmp:
        result = compare(refs, tmp)
        c.log_artifacts(run_id, tmp, artifact_path="comparison")
    where = f"runs:/{run_id}/comparison/{MD_NAME}"
    description = f"Compared with champion v{before} ({where}):\n\n" + table_markdown(result["subjects"])
    c.set_model_version_tag(name, challenger, COMPARISON_TAG, where)
    c.update_model_version(name, challenger, description=description[:5000])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("refs", nargs="*", metavar="RUN_OR_VERSION")
    parser.add_argument(
        "--champion", action="store_true", help="compare the registry's champion and challenger"
    )
    parser.add_argument("--model", default=MODEL_NAME, help="with --champion: the registered model")
    parser.add_argument("--out", default="comparison", help="folder for comparison.md and .png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    refs = (champion_refs(args.model) if args.champion else []) + list(args.refs)
    try:
        result = compare(refs, args.out)
    except VimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result["table"])
    print(" ".join(f for f in result["files"].values() if f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
