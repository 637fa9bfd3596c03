"""Every params.yaml key is read by the pipeline, so none is kept alive only by validation and tests.

A key counts as read when (a) it lies under a `params:` entry of a dvc.yaml stage, so changing it re-runs
what depends on it, and (b) its name, and the name of every section above it, is read as an attribute
(`x.name` or `getattr(x, "name")`) somewhere in vim_core or flows outside the config layer. (b) goes by
name, so it can miss a key whose name is also used for something else; (a) catches most of those.
"""

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]

# (a) exceptions: sections read by flows that run outside `dvc repro`, so they are no stage's params
# (changing them must not re-run the pipeline).
OUTSIDE_DVC = {
    "promotion": "flows/publish.py: the champion/challenger rule applied after the pipeline ran",
    "schedule": "flows/deploy.py: the cron of the retraining deployment",
}

# (b) exceptions: sections handed whole to a config model's own method, which reads their fields inside
# the config layer. Their keys must be read there, outside validators.
READ_WHOLE = {
    # make_scheduler(opt, cfg.train.schedule, steps) calls the schedule's lr_at and check_total.
    "tokenizer.train.schedule": "vim_core/config/schedule.py",
    "transformer.train.schedule": "vim_core/config/schedule.py",
    # TransformerSection.uncond_section() turns it into the section that trains the unconditional copy.
    "transformer.uncond": "vim_core/config/pipeline.py",
    "transformer.uncond.schedule": "vim_core/config/schedule.py",
}


def _leaf_paths(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            paths += _leaf_paths(value, (*prefix, key))
        else:
            paths.append((*prefix, key))
    return paths


def _attribute_names(tree: ast.AST, skip_validators: bool = False) -> set[str]:
    """Names read as `x.name` or `getattr(x, "name")`; optionally outside pydantic validators."""
    skipped: set[int] = set()
    if skip_validators:
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and any(
                "validator" in ast.unparse(d) for d in fn.decorator_list
            ):
                skipped |= {id(n) for n in ast.walk(fn)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            names.add(node.args[1].value)
    return names


def _readers() -> set[str]:
    sources = [p for p in (REPO / "vim_core").rglob("*.py") if "config" not in p.relative_to(REPO).parts]
    sources += list((REPO / "flows").rglob("*.py"))
    return set().union(*(_attribute_names(ast.parse(p.read_text())) for p in sources))


def _stage_params() -> set[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {entry for stage in stages.values() for entry in stage.get("params", [])}


def unread_keys(params: dict) -> list[str]:
    """Dotted key paths of `params` that fail (a) or (b), each with the reason."""
    stage_params, readers = _stage_params(), _readers()
    whole = {
        prefix: _attribute_names(ast.parse((REPO / path).read_text()), skip_validators=True)
        for prefix, path in READ_WHOLE.items()
    }
    problems = []
    for path in _leaf_paths(params):
        dotted = ".".join(path)
        covered = path[0] in OUTSIDE_DVC or any(
            dotted == entry or dotted.startswith(entry + ".") for entry in stage_params
        )
        if not covered:
            problems.append(f"{dotted}: under no stage's params in dvc.yaml")
        names = readers.union(*(n for p, n in whole.items() if dotted.startswith(p + ".")))
        missing = [name for name in path if name not in names]
        if missing:
            problems.append(f"{dotted}: {', '.join(missing)} never read as an attribute in vim_core or flows")
    return problems


def test_every_params_yaml_key_is_read():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert unread_keys(params) == []


def test_every_stage_params_entry_names_a_params_yaml_key():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for entry in _stage_params():
        node = params
        for part in entry.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml names {entry}, which params.yaml lacks"
            node = node[part]


def test_the_check_finds_keys_nothing_reads():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # The key this check was written for: under no stage, and nothing reads a `rejection` section.
    params["transformer"]["rejection"] = {"mode": "acceptance_rate", "acceptance_rate": 0.5}
    params["tokenizer"]["loss"]["focal_gamma"] = 2.0
    params["tokenizer"]["train"]["schedule"]["cycles"] = 3  # a whole-section key: read in lr_at or not
    unread = "never read as an attribute in vim_core or flows"
    assert unread_keys(params) == [
        f"tokenizer.loss.focal_gamma: focal_gamma {unread}",
        f"tokenizer.train.schedule.cycles: cycles {unread}",
        "transformer.rejection.mode: under no stage's params in dvc.yaml",
        f"transformer.rejection.mode: rejection {unread}",
        "transformer.rejection.acceptance_rate: under no stage's params in dvc.yaml",
        f"transformer.rejection.acceptance_rate: rejection {unread}",
    ]
