"""vim_core's and flows' imports point down their layers and never loop, checked on the sources with ast.

Layers, lowest first (PACKAGE_ORDER): the leaf utilities (errors, io, layers, redact, timing) and config,
then data, tokenizer, transformer, train, eval, study (with promotion and comparison), cli, one package to a
layer above config. A module may import its own package or any package below it, so the packages form a
chain with no cycle between them (the old data.tokenize -> tokenizer -> data loop through
tokenizer.palette cannot come back). Imports inside functions and under TYPE_CHECKING count like
module-level ones: they are the same dependency, only later. flows (the stage entry points and the Prefect
flows above them) is the layer above all of vim_core, and a stage entry point reaches no module that
imports Prefect: vim_core never imports it, and its own modules never loop either (the old mlflow_run <->
outbox loop, hidden in a function-level import, cannot come back).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "vim_core"
FLOWS = ROOT.parent / "flows"

# Lowest first; the packages of one tuple share a layer (the leaf utilities may import each other, the
# module-level cycle check still keeps them from looping).
PACKAGE_ORDER = (
    (
        "vim_core",  # the package's __init__: a version string, no imports
        "vim_core.config",
        "vim_core.errors",
        "vim_core.io",
        "vim_core.layers",
        "vim_core.redact",
        "vim_core.timing",
        "vim_core.progress",
    ),
    ("vim_core.data",),
    ("vim_core.tokenizer",),  # reads and writes shards: palette fitting, tokenize_dataset
    ("vim_core.transformer",),
    ("vim_core.train",),
    ("vim_core.eval",),
    # over runs' metrics: study statistics and reports (reads eval's sampling keys), the promotion rule, and
    # the side-by-side comparison of runs
    ("vim_core.study", "vim_core.promotion", "vim_core.comparison"),
    ("vim_core.cli",),
    ("flows",),  # one flat package: every flows module, above all of vim_core
)
LAYERS = {package: layer for layer, group in enumerate(PACKAGE_ORDER) for package in group}
ABOVE_CONFIG = (
    "vim_core.data",
    "vim_core.tokenizer",
    "vim_core.transformer",
    "vim_core.train",
    "vim_core.eval",
)


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(*roots: Path) -> dict[str, set[str]]:
    """module -> the modules under roots (default vim_core) it imports anywhere in its source."""
    files = {_module_name(p, root): p for root in roots or (ROOT,) for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb from this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in files else base)
        targets = {t for t in targets if t in files}
        # Importing a.b.c first runs the __init__ of packages a.b and a; those outside this module's own
        # packages are dependencies too (the old config <-> train.schedule loop ran through config's).
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
        inits = {".".join(t.split(".")[:i]) for t in targets for i in range(1, len(t.split(".")))}
        graph[name] = (targets | ((inits & files.keys()) - own)) - {name}
    return graph


def layer_of(module: str) -> int:
    # The root package names only its own __init__; every other entry covers its submodules too.
    matches = [p for p in LAYERS if module == p or (p != "vim_core" and module.startswith(p + "."))]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to PACKAGE_ORDER in {Path(__file__).name}")
    return LAYERS[max(matches, key=len)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def package_of(module: str) -> str:
    """The top-level piece a module belongs to: vim_core.data.shards -> vim_core.data, flows.x -> flows."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "vim_core" else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed onto packages: package -> the other packages its modules import."""
    packages: dict[str, set[str]] = {}
    for src, targets in graph.items():
        packages.setdefault(package_of(src), set()).update(package_of(t) for t in targets)
    return {p: targets - {p} for p, targets in packages.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in graph.items()
        for dst in targets
        if layer_of(dst) > layer_of(src)
    )


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_import_cycles_between_packages():
    assert cycles(package_graph(import_graph())) == []


def test_flows_modules_never_loop_and_vim_core_never_imports_flows():
    graph = import_graph(ROOT, FLOWS)
    assert any(t.startswith("vim_core.") for t in graph["flows.common"])  # the graph sees across both
    assert cycles(graph) == []
    assert cycles(package_graph(graph)) == []
    assert upward_imports(graph) == []


def _imports_prefect(module: str) -> bool:
    path = ROOT.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if any(n.split(".")[0] == "prefect" for n in names):
            return True
    return False


def test_stage_entry_points_reach_no_prefect():
    """Every module a dvc.yaml stage command can import, at any depth, in any function, imports no Prefect:
    a stage is plain Python under DVC, and Prefect sits above it (flows.pipeline)."""
    import yaml

    stages = yaml.safe_load((ROOT.parent / "dvc.yaml").read_text())["stages"]
    graph = import_graph(ROOT, FLOWS)
    for name, spec in stages.items():
        module = spec["cmd"].removeprefix("python -m ")
        seen, todo = set(), [module, "flows"]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(graph.get(current, ()))
        assert not sorted(m for m in seen if _imports_prefect(m)), name
    assert _imports_prefect("flows.pipeline")  # the check sees an import of prefect


def test_config_imports_nothing_above_it_and_no_torch():
    config = ROOT / "config"
    graph = import_graph()
    for module, targets in graph.items():
        if module == "vim_core.config" or module.startswith("vim_core.config."):
            assert not [t for t in targets if t.startswith(ABOVE_CONFIG)], module
    for path in config.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] == "torch"], f"{path.name} imports torch"


def test_no_module_imports_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_the_checks_see_cycles_and_upward_imports(tmp_path):
    pkg = tmp_path / "vim_core"
    for rel, text in {
        "__init__.py": "",
        "config/__init__.py": "from vim_core.train.schedule import make_scheduler\n",
        "train/__init__.py": "",
        "config/base.py": "",
        "train/schedule.py": "from vim_core.config.base import StrictModel\n",  # runs config's __init__ first
        "tokenizer/__init__.py": "",
        "tokenizer/model.py": "def f():\n    from vim_core.tokenizer.losses import x\n",
        "tokenizer/losses.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from vim_core.tokenizer import model\n",
        "tokenizer/vit.py": "from . import model\n",
        # No module loop, but a package one: data -> tokenizer -> data, as data.tokenize and palette had.
        "data/__init__.py": "",
        "data/shards.py": "",
        "data/tokenize.py": "from vim_core.tokenizer.vit import encode\n",
        "tokenizer/palette.py": "from vim_core.data.shards import iter_shards\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph["vim_core.tokenizer.vit"] == {"vim_core.tokenizer.model"}  # relative import resolved
    assert graph["vim_core.train.schedule"] == {"vim_core.config", "vim_core.config.base"}
    assert cycles(graph) == [
        ["vim_core.config", "vim_core.train.schedule"],
        ["vim_core.tokenizer.losses", "vim_core.tokenizer.model"],
    ]
    assert cycles(package_graph(graph)) == [
        ["vim_core.config", "vim_core.train"],
        ["vim_core.data", "vim_core.tokenizer"],
    ]
    assert upward_imports(graph) == [
        "vim_core.config (layer 0) imports vim_core.train (layer 4)",
        "vim_core.config (layer 0) imports vim_core.train.schedule (layer 4)",
        "vim_core.data.tokenize (layer 1) imports vim_core.tokenizer (layer 2)",
        "vim_core.data.tokenize (layer 1) imports vim_core.tokenizer.vit (layer 2)",
    ]
    (pkg.parent / "flows").mkdir()
    (pkg.parent / "flows" / "__init__.py").write_text("")
    (pkg.parent / "flows" / "a.py").write_text("def f():\n    from flows import b\n")
    (pkg.parent / "flows" / "b.py").write_text("from flows.a import f\nfrom vim_core import data\n")
    (pkg / "data" / "shards.py").write_text("from flows.a import f\n")
    both = import_graph(pkg, pkg.parent / "flows")
    assert ["flows.a", "flows.b"] in cycles(both)  # the function-level import counts
    assert "vim_core.data.shards (layer 1) imports flows.a (layer 8)" in upward_imports(both)
    assert ["flows", "vim_core.data", "vim_core.tokenizer"] in cycles(package_graph(both))
    with pytest.raises(AssertionError, match="vim_core.newtop is in no layer"):
        layer_of("vim_core.newtop")
