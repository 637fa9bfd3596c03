"""What dvc.yaml declares for each stage, read in this one place: the params it reads, the metrics file and
the plots it writes.

The flows write, and their MLflow runs log, exactly these paths, so `dvc metrics show`, `dvc plots show`
and a stage's run present the same files, and a path is spelled once, in dvc.yaml. Paths are as dvc.yaml
spells them: relative to its folder, where DVC runs each stage's command, i.e. to a stage's working
directory.
"""

from dataclasses import dataclass
from pathlib import Path

from vim_core.errors import VimError

DVC_YAML = "dvc.yaml"
CHECKOUT_DVC_YAML = Path(__file__).resolve().parents[1] / DVC_YAML


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml; empty when dvc.yaml, or the stage in it, is missing."""

    name: str
    params: tuple[str, ...] = ()  # dotted params.yaml keys; other params files' keys are left out
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()

    @property
    def metrics_file(self) -> str:
        """The one metrics JSON the stage's flow writes."""
        if len(self.metrics) != 1:
            count = len(self.metrics)
            raise VimError(f"{DVC_YAML}: stage {self.name} declares {count} metrics files, not one")
        return self.metrics[0]

    @property
    def plots_dir(self) -> str:
        """The folder of the stage's plots; the trainers and the evaluation name the files in it."""
        folders = {Path(p).parent.as_posix() for p in self.plots}
        if len(folders) != 1:
            count = len(folders)
            raise VimError(f"{DVC_YAML}: stage {self.name} declares its plots in {count} folders, not one")
        return folders.pop()


def dvc_yaml_path() -> Path:
    """./dvc.yaml, where DVC runs the stages; else this checkout's, so a flow run elsewhere writes the same."""
    local = Path(DVC_YAML)
    return local if local.is_file() else CHECKOUT_DVC_YAML


def _stages(dvc_yaml: str | Path | None) -> dict:
    import yaml

    path = Path(dvc_yaml) if dvc_yaml is not None else dvc_yaml_path()
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()).get("stages") or {}


def _out_path(entry) -> str:
    """A dvc.yaml output entry: a path, or {path: options}."""
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def _stage(name: str, spec: dict) -> Stage:
    return Stage(
        name,
        params=tuple(k for k in spec.get("params") or () if not isinstance(k, dict)),
        metrics=tuple(_out_path(e) for e in spec.get("metrics") or ()),
        plots=tuple(_out_path(e) for e in spec.get("plots") or ()),
    )


def declared(name: str, dvc_yaml: str | Path | None = None) -> Stage:
    """Stage `name` as dvc.yaml (default: dvc_yaml_path()) declares it."""
    return _stage(name, _stages(dvc_yaml).get(name) or {})


def all_declared(dvc_yaml: str | Path | None = None) -> list[Stage]:
    """Every stage of dvc.yaml, in its order."""
    return [_stage(name, spec or {}) for name, spec in _stages(dvc_yaml).items()]
