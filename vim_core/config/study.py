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


class MetricSpec(StrictModel):
    """One row of the report: a number from one stage's metrics JSON."""

    key: str
    source: Literal["tokenizer", "transformer", "eval"]
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

    def runs(self) -> list["Run"]:
        out = []
        for arm, spec in self.arms.items():
            for seed in spec.seeds if spec.seeds is not None else self.seeds:
                overrides = {**self.overrides, **spec.overrides, "seed": seed}
                out.append(Run(study=self.name, arm=arm, seed=seed, overrides=overrides))
        return out


class Run(StrictModel):
    study: str
    arm: str
    seed: int
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.study}-{self.arm}-s{self.seed}"


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
    unknown = sorted({a for a in [*spec.compare, *spec.paper] if a not in spec.arms})
    if unknown:
        raise ConfigError([f"{path}: compare/paper name arms that do not exist: {unknown}"])
    params = load_params(params_path)
    for run in spec.runs():
        sets = [f"{k}={json.dumps(v)}" for k, v in run.overrides.items()]
        try:
            apply_overrides(params, sets, source=f"{path}: arm {run.arm}")
        except ConfigError as err:
            raise ConfigError(err.lines) from None
    return spec
