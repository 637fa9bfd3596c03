"""Publish a finished pipeline run: log its model to MLflow, register it as the challenger, promote.

Not a DVC stage: its output is registry state, not files. `flows/retrain.py` calls it right after
`dvc repro`; `python -m flows.publish` does the same for a pipeline you ran yourself. It refuses to
publish when `dvc status` says the outputs are stale, so the registered weights are the ones the evaluate
stage's metrics were measured on.

One model, `vim`: the generator pyfunc logged from code (flows/pyfunc_models.py) with a signature (class
ids in, PNG images out), its artifacts the pipeline's tokenizer and transformer safetensors files. It is
registered with the eval metrics and the eval-config hash, aliased `challenger`, and compare_and_promote
moves `champion` to it only if it beats the champion on params.yaml's `promotion:` rule. The
challenger's comparison with the champion it faced (flows/compare.py: metrics table and sample grids)
is then logged on its run and linked from its version.
"""

import argparse
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from prefect import flow, task

from flows import vcs
from flows.compare import attach_to_version
from flows.flow_cli import failed_on_bad_input, run_flow_cli
from flows.mlflow_run import check_reachable, enabled
from flows.registry import compare_and_promote, register_challenger
from flows.retry import transient_retries
from flows.stages import declared
from flows.tracking import log_json_metrics, stage_run
from vim_core.config import Params, load_params
from vim_core.errors import TransientError, VimError

log = logging.getLogger("vim.publish")

REPO = Path(__file__).resolve().parents[1]
MODEL_CODE = Path(__file__).with_name("pyfunc_models.py")
# What the logged models import, pinned to the versions that logged them.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "einops",
    "safetensors",
    "fsspec",
    "pyyaml",
    "tqdm",
)
RETRY = transient_retries()


# ---- what gets logged


def model_files(params: Params) -> dict[str, str]:
    """The pipeline's exported weights (relative to the working directory), checked to belong together:
    the tokenizer, the transformer and, where transformer.uncond trains one, its unconditional copy."""
    from vim_core.io import sha256_file
    from vim_core.transformer.export import load_transformer

    files = {
        "tokenizer": str(Path(params.tokenizer.out_dir) / "tokenizer.safetensors"),
        "transformer": str(Path(params.transformer.out_dir) / "transformer.safetensors"),
    }
    if (copy := params.transformer.uncond_section()) is not None:
        files["transformer_uncond"] = str(Path(copy.out_dir) / "transformer.safetensors")
    for path in files.values():
        if not Path(path).is_file():
            raise VimError(f"{path} is missing; run the pipeline (dvc repro) first")
    tokenizer_sha = sha256_file(files["tokenizer"])
    for key in ("transformer", "transformer_uncond"):
        expected = load_transformer(files[key])[1].get("tokenizer_sha256") if key in files else None
        if expected and expected != tokenizer_sha:
            raise VimError(
                f"{files[key]} was trained on tokens of another tokenizer than {files['tokenizer']}"
            )
    return files


def sampling_defaults(params: Params, used: dict | None = None) -> dict:
    """The sampling options the evaluate stage used; the generator's defaults (0 / 1.0 switch top-k/p off).

    `used`: eval.json's definitions.generation, whose guidance scale, temperature, top-k and top-p are
    those that evaluate.sampling_search picked on val, when it is on; params alone give them otherwise.
    """
    s = params.transformer.sampling
    cfg = params.evaluate.cfg_scale if params.evaluate.cfg_scale is not None else s.cfg_scale
    temperature, top_k, top_p = s.temperature, s.top_k, s.top_p
    if used:
        cfg, temperature = used.get("cfg_scale", cfg), used.get("temperature", temperature)
        top_k, top_p = used.get("top_k", top_k), used.get("top_p", top_p)
    return {
        "temperature": float(temperature),
        "top_k": int(top_k or 0),
        "top_p": float(top_p if top_p is not None else 1.0),
        "cfg_scale": float(cfg),
        "seed": int(s.seed),
        "batch_size": int(s.batch_size),
    }


def signature(files: dict[str, str], defaults: dict):
    """The generator's signature: class ids and sampling options in, one PNG per class id out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {"temperature": "double", "top_p": "double", "cfg_scale": "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("long")]),  # unnamed: a DataFrame column, a list or an array all fit
        outputs=Schema([ColSpec("long", "class_id"), ColSpec("string", "image_png")]),
        params=ParamSchema(
            [ParamSpec(k, kinds.get(k.removeprefix("uncond_"), "long"), v) for k, v in defaults.items()]
        ),
    )


def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


@contextmanager
def vim_core_source() -> Iterator[str]:
    """A copy of vim_core's Python files (no embedded data), shipped in the model's code folder."""
    src = REPO / "vim_core"
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "vim_core"
        for path in src.rglob("*.py"):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        yield str(dst)


@contextmanager
def _in_run(run_id: str) -> Iterator[None]:
    """mlflow.pyfunc.log_model logs to the fluent active run: make it `run_id` in this thread."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


@contextmanager
def _mlflow_io() -> Iterator[None]:
    """Turn MLflow's 'server did not answer' errors into TransientError, so the task retries them."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        text = str(err)
        if err.error_code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") or "Max retries" in text:
            raise TransientError(f"MLflow: {text.splitlines()[0]}") from err
        raise


# ---- the tasks


@task(**RETRY)
def log_model(params: Params, run_id: str) -> str:
    """Log the `vim` pyfunc to `run_id`, the weights as its artifacts; returns its models:/m-... URI."""
    import mlflow

    check_reachable()
    files = model_files(params)
    defaults = sampling_defaults(params, evaluated_sampling(params))
    if "transformer_uncond" in files:  # class id -1's own options: evaluate's pick for the copy's draws
        free = sampling_defaults(params, evaluated_sampling(params, "generation_uncond"))
        defaults |= {f"uncond_{k}": free[k] for k in ("temperature", "top_k", "top_p")}
    with _mlflow_io(), _in_run(run_id), vim_core_source() as code, warnings.catch_warnings():
        if "transformer_uncond" in files:  # artifacts keep their file names: the copy's must differ
            named = Path(code).parent / "transformer_uncond.safetensors"
            shutil.copy2(files["transformer_uncond"], named)
            files = {**files, "transformer_uncond": str(named)}
        # the signature is explicit; an input example would only make MLflow sample at log time
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="vim",
            python_model=str(MODEL_CODE),
            artifacts=files,
            code_paths=[code],
            signature=signature(files, defaults),
            model_config=defaults,
            pip_requirements=requirements(),
        )
    return info.model_uri


@task(**RETRY)
def register(uri: str, metrics: dict, run_id: str, eval_hash: str) -> str:
    with _mlflow_io():
        return register_challenger(uri, metrics, run_id, eval_hash=eval_hash)


@task(**RETRY)
def promote(params: Params, run_id: str) -> dict:
    p = params.promotion
    with _mlflow_io():
        return compare_and_promote(
            metric=p.metric,
            lower_is_better=p.lower_is_better,
            guard_metric=p.guard_metric,
            guard_min=p.guard_min,
            run_id=run_id,
        )


def compare_with_champion(decision: dict) -> None:
    """Attach the champion-vs-challenger comparison (flows.compare) to the challenger version's run.

    The registry state is already decided; a comparison that cannot be made is a warning, not a failure.
    """
    from mlflow.exceptions import MlflowException

    try:
        with _mlflow_io():
            attach_to_version(decision)
    except (VimError, MlflowException) as err:
        log.warning("could not attach the comparison with the champion: %s", str(err).splitlines()[0])


# ---- checks before anything is registered


def evaluated_sampling(params: Params, which: str = "generation") -> dict:
    """definitions.generation of eval.json (or `which`: generation_uncond, the unconditional samples'),
    where a sampling search picked the settings.

    Without a search, params alone say how evaluate sampled, and this is empty. With one, the eval.json
    must be the one these params scored (same eval-config hash), or the generator would serve the pick
    of another model.
    """
    if params.evaluate.sampling_search is None:
        return {}
    from vim_core.eval.report import eval_config_hash

    path = Path(declared("evaluate").metrics_file)
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data.get("eval_config_hash") != eval_config_hash(params):
        raise VimError(f"{path} is missing or was scored with other eval settings; run dvc repro first")
    return data.get("definitions", {}).get(which, {})


def eval_metrics(params: Params) -> tuple[dict[str, float], str]:
    """The eval metrics to register and their eval-config hash, checked against the current params."""
    from vim_core.eval.report import eval_config_hash

    path = Path(declared("evaluate").metrics_file)
    if not path.is_file():
        raise VimError(f"{path} is missing; run the pipeline (dvc repro) first")
    data = json.loads(path.read_text())
    recorded, current = data.get("eval_config_hash"), eval_config_hash(params)
    if recorded != current:
        raise VimError(
            f"{path} was scored with eval config {recorded}, params.yaml now gives {current}; "
            "run dvc repro first"
        )
    numbers = {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return numbers, current


def check_up_to_date() -> None:
    """Refuse stale outputs: `dvc status` must report nothing changed (skipped outside a DVC repo)."""
    if not Path("dvc.yaml").is_file() or not Path(".dvc").is_dir():
        return
    out = vcs.dvc("status", "--json", "--quiet", timeout=300)
    try:
        changed = json.loads(out or "{}")
    except json.JSONDecodeError:
        raise VimError(f"dvc status: not JSON: {out.strip()[-300:]}") from None
    if changed:
        raise VimError(
            f"the pipeline's outputs are stale ({', '.join(sorted(changed))}); run dvc repro first"
        )


# ---- the flow


def publish_pipeline(params: Params, check_status: bool = True) -> dict:
    """Log, register and compare, in a `publish` run (nested under the pipeline run when there is one)."""
    if not enabled():
        raise VimError("publishing registers models in MLflow; it needs tracking on (unset VIM_TRACKING)")
    if check_status:
        check_up_to_date()
    metrics, eval_hash = eval_metrics(params)
    with stage_run("publish", {"promotion": params.promotion.model_dump(mode="json")}) as tracker:
        log_json_metrics(tracker, declared("evaluate").metrics_file)
        uri = log_model(params, tracker.run_id)
        version = register(uri, metrics, tracker.run_id, eval_hash)
        decision = promote(params, tracker.run_id)
        compare_with_champion(decision)
    log.info("registered v%s; promotion %s: %s", version, decision["outcome"], decision["reason"])
    versions = {decision["model"]: version}  # the shape flows.retrain reports
    return {"run_id": tracker.run_id, "model": uri, "versions": versions, "promotion": decision}


@flow(name="publish")
def publish(params_path: str = "params.yaml"):
    """Register the pipeline's model as the challenger and promote it if it beats the champion."""
    return failed_on_bad_input(_publish, params_path)


def _publish(params_path: str) -> dict:
    report = publish_pipeline(load_params(params_path))
    decision = report["promotion"]
    print(
        json.dumps(
            {"versions": report["versions"], "promotion": decision["outcome"], "reason": decision["reason"]}
        )
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=publish.__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    return run_flow_cli(  # bad params fail before Prefect starts, one line per problem
        lambda: load_params(args.params), lambda: publish(params_path=args.params, return_state=True)
    )


if __name__ == "__main__":
    sys.exit(main())
