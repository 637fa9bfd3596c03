"""Security checks of the default suite, each marked `security` for reports/reliability.json.

(a) nothing in the sources unpickles: every torch.load passes weights_only=True, and no pickle, joblib,
    dill or numpy allow_pickle load exists; and a malicious file is refused at run time without running.
(b) the servers the project starts, and the commands its docs give, bind 127.0.0.1 unless told otherwise.
(c) docker/compose.yaml holds no default password: each secret must come from docker/.env, which git ignores.
(d) the served generator caps the images per request: a real `mlflow models serve` answers HTTP 400.
"""

import ast
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests import servers
from tests.flows.test_orchestration_models import logged, micro, one_thread, store  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("vim_core", "flows", "benchmarks", "scripts")
pytestmark = pytest.mark.security

# ---------------------------------------------------------------- (a) no unpickling


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _true_keyword(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
    )


UNPICKLERS = re.compile(
    r"^(c?pickle|_pickle|joblib|dill|cloudpickle|shelve|pandas|pd)\.(load|loads|Unpickler|read_pickle|open)$"
)


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """`file:line call` for every load that may unpickle: torch.load without weights_only=True, any
    pickle/joblib/dill/shelve load, pandas.read_pickle, numpy load with allow_pickle=True."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # `from torch import load as tl` -> {"tl": "torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        bad = (
            (full in ("torch.load", "torch.serialization.load") and not _true_keyword(node, "weights_only"))
            or UNPICKLERS.match(full)
            or full in ("pickle.Unpickler", "pandas.read_pickle")
            or (full in ("numpy.load", "np.load") and _true_keyword(node, "allow_pickle"))
        )
        if bad:
            found.append(f"{filename}:{node.lineno} {full}")
    return found


def test_the_scanner_finds_what_it_should():
    snippet = """
import pickle, joblib
import numpy as np
from torch import load as tl
import torch
torch.load("a")
torch.load("a", weights_only=False)
tl("a")
pickle.loads(b"")
joblib.load("x")
np.load("x.npy", allow_pickle=True)
torch.load("ok", weights_only=True)
np.load("ok.npz")
"""
    assert [f.split(" ")[1] for f in unsafe_loads(snippet)] == [
        "torch.load",
        "torch.load",
        "torch.load",
        "pickle.loads",
        "joblib.load",
        "numpy.load",
    ]


def test_sources_never_unpickle():
    files = sorted(p for d in SOURCES for p in (REPO / d).rglob("*.py"))
    assert len(files) > 40
    found = [f for p in files for f in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, "loads that may unpickle: " + ", ".join(found)


class TouchOnUnpickle:
    """Unpickling this creates `marker`: evidence that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_lpips_weights_are_refused_unrun(tmp_path):
    """The LPIPS head file has no published checksum, so only weights_only stands between it and its code."""
    from vim_core.errors import VimError
    from vim_core.tokenizer.lpips import LPIPS, LPIPS_FILE, VGG16_FILE

    marker = tmp_path / "pwned"
    torch.save({"features.0.weight": TouchOnUnpickle(marker)}, tmp_path / VGG16_FILE)
    torch.save({"lin0.model.1.weight": TouchOnUnpickle(marker)}, tmp_path / LPIPS_FILE)
    with pytest.raises(VimError) as err:
        LPIPS(str(tmp_path), verify_checksums=False)  # skip the sha256 check: reach the loader itself
    assert f"cannot read weights file {VGG16_FILE}" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_unrun_on_resume(tmp_path):
    """`resume: auto` on a checkpoint whose state.pt (checksums resealed) carries a pickle payload."""
    from vim_core.errors import VimError
    from vim_core.io import sha256_file
    from vim_core.train.checkpoint import maybe_resume, save_checkpoint

    model = torch.nn.Linear(2, 2)
    ckpt = save_checkpoint(tmp_path / "ckpt", 3, {"model": model})
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "rng": TouchOnUnpickle(marker)}, ckpt / "state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VimError, match="state.pt: unreadable"):
        maybe_resume(tmp_path / "ckpt", "auto", {"model": model})
    assert not marker.exists()


# ---------------------------------------------------------------- (b) loopback by default


def test_prefect_and_mlflow_servers_default_to_loopback():
    """The commands README.md and docs/ give (`prefect server start`, `mlflow server|ui|models serve`) with no
    host option bind what these defaults say, in the pinned versions; we set none of them otherwise."""
    import mlflow.cli
    from mlflow.models.cli import commands as model_commands
    from prefect.settings import Settings

    settings = Settings()
    assert settings.server.api.host == "127.0.0.1"
    assert settings.runner.server.host in ("localhost", "127.0.0.1")  # `flow.serve`'s optional webserver
    for cmd in (mlflow.cli.server, model_commands.commands["serve"]):
        host = next(p for p in cmd.params if p.name == "host")
        assert host.default == "127.0.0.1", cmd.name


DOCS = ("README.md", "Makefile", "docker/README.md", "benchmarks/README.md")
HOST_FLAG = re.compile(r"(?:--host|-h|-H|--bind|--listen)[ =]+([0-9a-zA-Z.:\[\]]+)")


def _project_commands() -> list[tuple[str, str]]:
    """(where, text) of what the project runs or tells users to run outside a container."""
    found = []
    for rel in DOCS + tuple(str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md"))):
        path = REPO / rel
        if path.is_file():
            found += [(f"{rel}:{i}", line) for i, line in enumerate(path.read_text().splitlines(), 1)]
    for d in ("flows", "tests", "scripts", "benchmarks"):
        for p in sorted((REPO / d).rglob("*.py")):
            found += [
                (f"{p.relative_to(REPO)}:{i}", line) for i, line in enumerate(p.read_text().splitlines(), 1)
            ]
    return found


def test_project_commands_bind_loopback():
    """No command in the docs, the Makefile, the flows or the tests binds a server to all interfaces."""
    wide = []
    for where, line in _project_commands():
        if where.startswith(("tests/integration/test_security.py", "tests/integration/test_docker_files.py")):
            continue  # those two quote hosts to check them; compose's 0.0.0.0 is inside the containers
        for host in HOST_FLAG.findall(line):
            if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("$"):
                wide.append(f"{where}: {line.strip()}")
        if "0.0.0.0" in line and "BIND_ADDRESS=0.0.0.0" not in line:
            wide.append(f"{where}: {line.strip()}")
    assert not wide, "binds beyond loopback: " + "; ".join(wide)
    # the test servers (tests/servers.py), Prefect's included, are started on 127.0.0.1
    assert '"-H", "127.0.0.1"' in (REPO / "tests" / "conftest.py").read_text()
    assert '"--host", "127.0.0.1"' in (REPO / "tests" / "servers.py").read_text()


def test_compose_publishes_ports_on_loopback_only():
    """Inside the containers the servers listen on 0.0.0.0; on the host, ports bind BIND_ADDRESS, 127.0.0.1
    unless docker/.env says otherwise."""
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    ports = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert ports
    for name, port in ports:
        assert isinstance(port, str) and port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    env_example = (REPO / "docker" / ".env.example").read_text()
    assert re.search(r"^BIND_ADDRESS=127\.0\.0\.1$", env_example, re.M)


# ---------------------------------------------------------------- (c) no default passwords

SECRET = re.compile(r"PASSWORD|SECRET|TOKEN")  # AWS_ACCESS_KEY_ID names an identity; its secret is the key


def test_compose_has_no_default_passwords():
    text = (REPO / "docker" / "compose.yaml").read_text()
    refs = re.findall(r"\$\{([A-Z0-9_]+)([^}]*)\}", text)
    secrets = [(var, rest) for var, rest in refs if SECRET.search(var)]
    assert {v for v, _ in secrets} >= {"MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"}
    defaulted = [f"${{{v}{r}}}" for v, r in secrets if not r.startswith(":?")]
    assert not defaulted, f"secrets with a default or no requirement: {defaulted}"
    # no literal secret either: every `...PASSWORD: value` in compose refers to a variable
    for key, value in re.findall(r"^\s*([A-Z0-9_]*(?:PASSWORD|SECRET)[A-Z0-9_]*):\s*(.+)$", text, re.M):
        assert value.strip().startswith("${"), f"{key} has a literal value in compose.yaml"


def test_docker_env_is_git_ignored_and_the_example_holds_placeholders():
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0, "docker/.env is not git-ignored"
    tracked = subprocess.run(["git", "ls-files", "docker/.env"], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout.strip() == "", "docker/.env is committed"
    example = dict(
        line.split("=", 1)
        for line in (REPO / "docker" / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    secrets = {k: v for k, v in example.items() if SECRET.search(k)}
    assert secrets and all(v.startswith("change-me") for v in secrets.values()), secrets


# ---------------------------------------------------------------- (d) images per request


def test_generator_caps_images_per_request(logged):  # noqa: F811
    import mlflow
    from mlflow.exceptions import MlflowException

    from flows.pyfunc_models import MAX_IMAGES_PER_REQUEST

    gen = mlflow.pyfunc.load_model(logged)
    with pytest.raises(MlflowException, match=f"at most {MAX_IMAGES_PER_REQUEST}") as err:
        gen.predict(list(np.arange(MAX_IMAGES_PER_REQUEST + 1) % 10))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_served_generator_refuses_an_oversized_request(logged, tmp_path):  # noqa: F811
    """A real `mlflow models serve` of the generator, with the cap lowered to 3 on the server's side."""
    env = {"VIM_MAX_IMAGES_PER_REQUEST": "3"}
    with servers.model_server(logged, tmp_path / "serve.log", env=env) as url:
        status, answer = _post(f"{url}/invocations", {"inputs": [1, 2, 3, 4]})
        assert status == 400, answer
        assert (
            answer["message"]
            .splitlines()[-1]  # MLflow puts "Failed to predict data ..." on the line above ours
            .endswith("4 class ids in one request; at most 3 (set VIM_MAX_IMAGES_PER_REQUEST on the server)")
        ), answer
        status, answer = _post(f"{url}/invocations", {"inputs": [1, 2, 3]})
        assert status == 200 and len(answer["predictions"]) == 3
