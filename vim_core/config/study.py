"""Study files (studies/*.yaml): arms of params.yaml overrides, seeds, the metrics a report shows.

Validated here, before anything runs, so a bad study file fails with one line per problem.
"""

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from vim_core.config import apply_overrides, format_validation_error, load_params
from vim_core.config.base import StrictModel
from vim_core.errors import ConfigError

SLUG = r"^[a-z0-9][a-z0-9_-]*$"
# The dvc.yaml stage that writes each metrics source; a study that stops early reads only what it ran.
SOURCE_STAGES = {
    "tokenizer": "train_tokenizer",
    "tokenizer_eval": "evaluate_tokenizer",
    "transformer": "pretrain_transformer",
    "eval": "evaluate",
}


class MetricSpec(StrictModel):
    """One row of the report: a number from one stage's metrics JSON."""

    key: str
    source: Literal["tokenizer", "tokenizer_eval", "transformer", "eval"]
    label: str | None = None
    better: Literal["lower", "higher"] | None = None
    conditional: bool = Field(
        default=False,
        description="a class-conditional number: shown as '-' for an arm whose VIM is unconditional",
    )


def _distinct_seeds(seeds: list[int] | None) -> list[int] | None:
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    return seeds


class ArmSpec(StrictModel):
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted params.yaml key -> value")
    seeds: list[int] | None = Field(default=None, min_length=1, description="None: the study's seeds")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | None) -> list[int] | None:
        return _distinct_seeds(seeds)


class ScalingSpec(StrictModel):
    """A compute-scaling curve: arms grouped into series, one arm per budget, a metric fitted against FLOPs."""

    x: MetricSpec = Field(description="the compute axis, e.g. the tokenizer's train_flops")
    fit: str = Field(description="the metric key fitted as floor + a * (x / x_ref) ** -b")
    series: dict[str, list[str]] = Field(
        min_length=2, description="series name -> its arms, in increasing budget; the first two are compared"
    )

    @field_validator("series")
    @classmethod
    def _same_budgets(cls, series: dict) -> dict:
        sizes = {len(arms) for arms in series.values()}
        if len(sizes) != 1 or sizes.pop() < 3:
            raise ValueError("every series needs the same number of arms (budgets), at least 3")
        return series


class StudySpec(StrictModel):
    """A study file (studies/*.yaml)."""

    name: str = Field(pattern=SLUG)
    title: str
    question: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict, description="applied to every arm first")
    arms: dict[str, ArmSpec] = Field(min_length=1)
    compare: list[str] = Field(
        default_factory=list,
        description="the arms the headline compares: two, or the first against each of the others",
    )
    metrics: list[MetricSpec] = Field(min_length=1)
    paper: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="arm -> metric key -> the paper's figure, and 'source'"
    )
    notes: list[str] = Field(default_factory=list)
    stages: list[str] = Field(
        default_factory=list,
        description="dvc.yaml stages to run (with what they depend on), e.g. the tokenizer's; empty: all",
    )
    scaling: ScalingSpec | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        return _distinct_seeds(seeds)

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict) -> dict:
        bad = [a for a in arms if not re.match(SLUG, a)]
        if bad:
            raise ValueError(f"arm names must be lower-case letters, digits, - or _: {bad}")
        return arms

    def sources(self) -> set[str]:
        """The metrics sources the study's runs produce: all of them, or those of its stages."""
        return {src for src, stage in SOURCE_STAGES.items() if not self.stages or stage in self.stages}

    def runs(self) -> list["Run"]:
        out = []
        for arm, spec in self.arms.items():
            for seed in spec.seeds if spec.seeds is not None else self.seeds:
                overrides = {**self.overrides, **spec.overrides, "seed": seed}
                out.append(Run(study=self.name, arm=arm, seed=seed, overrides=overrides, stages=self.stages))
        return out


class Run(StrictModel):
    study: str
    arm: str
    seed: int
    overrides: dict[str, Any]
    stages: list[str] = Field(default_factory=list, description="the `dvc exp run` targets; empty: all")

    @property
    def name(self) -> str:
        return f"{self.study}-{self.arm}-s{self.seed}"

    def set_args(self) -> list[str]:
        """The overrides as `dvc exp run` arguments (-S ++key=value; ++ adds a key params.yaml lacks)."""
        return [arg for k, v in self.overrides.items() for arg in ("-S", f"++{k}={hydra_value(v)}")]

    def expected_params(self, params_path: str | Path) -> dict:
        """params.yaml as the run's experiment must record it: the file plus the overrides."""
        raw = yaml.safe_load(Path(params_path).read_text()) or {}
        for key, value in self.overrides.items():
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return json.loads(json.dumps(raw))


def hydra_value(value: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's): dicts, lists, null, numbers, text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    return text if text.replace("-", "").replace("_", "").isalnum() else "'" + text.replace("'", "\\'") + "'"


def load_study(path: str | Path, params_path: str | Path = "params.yaml") -> StudySpec:
    """Read and validate a study file; every arm's overrides must make a valid params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    try:
        raw = yaml.safe_load(path.read_text())
        spec = StudySpec.model_validate(raw or {})
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {getattr(err, 'problem', err)}"]) from None
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    named = [*spec.compare, *spec.paper]
    if spec.scaling is not None:
        named += [a for arms in spec.scaling.series.values() for a in arms]
    unknown = sorted({a for a in named if a not in spec.arms})
    if unknown:
        raise ConfigError([f"{path}: compare/paper/scaling name arms that do not exist: {unknown}"])
    wanted = [m for m in spec.metrics + ([spec.scaling.x] if spec.scaling else [])]
    unmade = sorted({m.source for m in wanted if m.source not in spec.sources()})
    if unmade:
        raise ConfigError(
            [f"{path}: metrics from {unmade} need stages the study does not run ({spec.stages})"]
        )
    if spec.scaling is not None and spec.scaling.fit not in {m.key for m in spec.metrics}:
        raise ConfigError([f"{path}: scaling.fit {spec.scaling.fit!r} is not one of the study's metrics"])
    params = load_params(params_path)
    for run in spec.runs():
        sets = [f"{k}={json.dumps(v)}" for k, v in run.overrides.items()]
        try:
            apply_overrides(params, sets, source=f"{path}: arm {run.arm}")
        except ConfigError as err:
            raise ConfigError(err.lines) from None
    return spec
