"""Typed params.yaml: every stage loads its knobs through these models, never raw dicts."""

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from vim_core.config.base import StrictModel
from vim_core.config.data import DataConfig, SourceConfig
from vim_core.config.pipeline import (
    EvaluateSection,
    PromotionConfig,
    ScheduleConfig,
    TokenizerSection,
    TransformerSection,
)
from vim_core.config.tokenizer import check_tokenizer
from vim_core.errors import ConfigError


class Params(StrictModel):
    """The whole params.yaml."""

    seed: int = Field(default=0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    transformer: TransformerSection = Field(default_factory=TransformerSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _sections_agree(self) -> "Params":
        try:
            check_tokenizer(self.tokenizer.model, self.tokenizer.loss, self.data.image_size)
        except ValueError as err:
            raise ValueError(f"data.image_size / tokenizer: {err}") from None
        try:
            self.transformer.resolved_model()
        except ValueError as err:
            raise ValueError(f"transformer.model: {err}") from None
        return self


def format_validation_error(err: ValidationError, source: str = "params.yaml") -> list[str]:
    """One line per problem: the key path, the bad value and the rule it broke."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        rule = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {path} = {shown}: {rule}")
    return lines


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: <root> = {type(raw).__name__}: must be a mapping of sections"])
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def apply_overrides(params: Params, sets: list[str], source: str = "--set") -> Params:
    """Params with dotted KEY=VALUE overrides (values read as YAML), validated like params.yaml.

    The same syntax as `dvc exp run -S`, for scripts that vary params without editing the file.
    """
    raw = params.model_dump(mode="json")
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"{source}: {item!r} is not KEY=VALUE"])
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ConfigError([f"{source}: {key}: {part!r} is not a section"])
        try:
            node[leaf] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError([f"{source}: {key}: {text!r} is not a YAML value"]) from None
    return parse_params(raw, source)


def read_params_file(path: str | Path) -> object:
    """The YAML of a params file, unvalidated; a missing or unparsable file is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}"]) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises ConfigError with one line per problem."""
    return parse_params(read_params_file(path), str(path))


def declared_params(dvc_yaml: str | Path) -> dict[str, list[str]]:
    """{dotted params.yaml key: the dvc.yaml stages that name it}; keys of other params files are left out."""
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    keys: dict[str, list[str]] = {}
    for name, spec in stages.items():
        for key in (spec or {}).get("params") or ():
            if isinstance(key, str):
                keys.setdefault(key, []).append(name)
    return keys


def missing_declared(raw: object, declared: dict[str, list[str]], source: str) -> list[str]:
    """One line per key that dvc.yaml's stages name but the params file lacks (`dvc repro` needs each)."""
    lines = []
    for key, stages in declared.items():
        node = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) and part in node else _MISSING
        if node is _MISSING:
            lines.append(f"{source}: {key}: missing; dvc.yaml's stage {', '.join(stages)} reads it")
    return lines


_MISSING = object()


def check_params_file(path: str | Path, dvc_yaml: str | Path | None = None) -> Params:
    """What `vim check-params` checks: load_params, plus every key dvc_yaml's stages name must be present.

    One ConfigError line per problem, all problems at once.
    """
    raw = read_params_file(path)
    lines = []
    if raw is None:
        lines.append(f"{path}: <root>: the file is empty")
    elif dvc_yaml is not None and isinstance(raw, dict):
        lines += missing_declared(raw, declared_params(dvc_yaml), str(path))
    try:
        params = parse_params(raw, str(path))
    except ConfigError as err:
        lines += err.lines
    if lines:
        raise ConfigError(lines)
    return params


__all__ = [
    "apply_overrides",
    "check_params_file",
    "ConfigError",
    "DataConfig",
    "Params",
    "SourceConfig",
    "TokenizerSection",
    "TransformerSection",
    "load_params",
    "parse_params",
]
