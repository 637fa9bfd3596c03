"""The UIs in a real browser: MLflow's registry and run comparison, Prefect's deployment page.

Headless Chromium (Debian's `chromium`; Playwright drives it through `executable_path` and never downloads
a browser of its own) against real `mlflow server` and `prefect server start` processes on 127.0.0.1, each
started for this module alone (the registry names are the pipeline's own, so they must not meet other
tests' models). Every test saves its screenshots in its tmp dir and, when VIM_SCREENSHOT_DIR is set, there
too (scripts/readme_images.py makes the docs' pictures from them).
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows import mlflow_run
from flows.registry import DECISION_TAG, METRIC_TAG, MODEL_NAME, PIPELINE_TAG
from tests import servers
from tests.mlflow_server import start_mlflow

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT_ENV = "VIM_SCREENSHOT_DIR"
CRON, TIMEZONE = "17 4 * * 2", "Europe/Paris"
EXPERIMENT = "vim"
# The second pipeline run's `--set` (dvc exp run -S): tiny_params trains the tokenizer for 60 steps, this
# for 3, which scores a worse PSNR every time and reruns every stage but prepare_data (about a minute).
VARIANT = ("tokenizer.train.steps", "60", "3")

MODEL_NAMES = (MODEL_NAME,)  # the registry holds one model


def chromium() -> str | None:
    return os.environ.get("VIM_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if not path:
        pytest.skip("no chromium: apt-get install chromium (or set VIM_CHROMIUM to a Chromium binary)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, timezone_id="UTC")
    ctx.set_default_timeout(60_000)  # the servers share two busy cores
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # expect() has its own default, 5 s
    yield ctx.new_page()
    ctx.close()


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """page's viewport as tmp_path/name.png, copied into $VIM_SCREENSHOT_DIR when set."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), animations="disabled")  # not caught mid-fade
    if os.environ.get(SCREENSHOT_ENV):
        dest = Path(os.environ[SCREENSHOT_ENV])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / path.name)
    return path


def _text(locator) -> str:
    return " ".join(locator.inner_text().split())


def _row(page, key: str):
    """The table row whose first cell is `key` (metric.fid_domain, not metric.fid_domain_real)."""
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=key, exact=True))


def tiny_env(prefect_home: Path, mlflow_url: str, experiment: str, prefect_api: str | None = None) -> dict:
    """The environment a tiny repository's retrain runs in: this venv's tools, tracking on (to
    `mlflow_url`), no parent run inherited, one torch thread; Prefect at `prefect_api`, else ephemeral."""
    env = {
        **os.environ,
        **servers.prefect_env(prefect_home, api_url=prefect_api),
        "PATH": f"{servers.BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
    }
    for key in (mlflow_run.PARENT_ENV, mlflow_run.SWITCH_ENV, mlflow_run.REGISTRY_ENV):
        env.pop(key, None)
    if prefect_api is None:
        env.pop("PREFECT_API_URL", None)
    return env


# ---- MLflow


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two real pipeline runs of a tiny repository (tiny_repo: micro params, ranked by PSNR) tracked on
    their own `mlflow server`: `python -m flows.retrain` promotes bundle 1, then a `dvc exp run -S` variant
    whose tokenizer trains for 3 steps instead of 60 scores worse and stays challenger (bundle 2)."""
    from mlflow import MlflowClient

    from tests.integration.test_orchestration_pipeline import _children, retrain, tiny_repo

    root = tmp_path_factory.mktemp("ui-mlflow")
    repo = tiny_repo(root / "repo")
    (root / "mlflow").mkdir()
    (root / "prefect").mkdir()
    server, proc = start_mlflow(root / "mlflow", timeout=300)  # shared, busy cores
    try:
        # no Prefect API URL: Prefect starts a temporary server for each retrain
        tiny = SimpleNamespace(repo=repo, env=tiny_env(root / "prefect", server.url, EXPERIMENT))
        summaries = [retrain(tiny), retrain(tiny, "--set", f"{VARIANT[0]}={VARIANT[2]}")]
        assert [s["promotion"] for s in summaries] == ["promoted", "kept"], summaries
        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        runs = []
        for version in ("1", "2"):  # each version's tag names its pipeline run; its children are the stages
            pipeline = client.get_model_version(MODEL_NAME, version).tags[PIPELINE_TAG]
            runs.append(_children(client, client.get_run(pipeline)))
        experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
        yield SimpleNamespace(url=server.url, client=client, experiment=experiment, runs=runs)
    finally:
        servers.stop(proc)


def open_mlflow(page, url: str, announcement: bool = False) -> None:
    """Load an MLflow UI page and close what covers it, as a person would: the assistant's side panel and,
    on the registry's pages (`announcement`), the "new model registry UI" modal of a first visit."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    if page.url.split("#")[0] == url.split("#")[0]:
        page.goto("about:blank")  # a new hash alone is no page load
    page.goto(url)
    page.get_by_role("button", name="Toggle sidebar").wait_for()  # the app has rendered
    # The run pages keep polling, so "network idle" may never come: wait for what covers the page instead.
    covers = [page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')]
    if announcement:
        covers.insert(0, page.get_by_role("dialog").filter(has_text="Model Registry UI"))
    for cover in covers:
        try:
            cover.wait_for(timeout=10_000)
        except PlaywrightTimeout:
            continue  # not shown (dismissed before, in this browser context)
        close = cover.get_by_role("button", name="Close") if cover is not covers[-1] else cover
        close.click()
        cover.wait_for(state="hidden")


def test_mlflow_registry_lists_the_models_with_champion_and_challenger(page, registry, tmp_path):
    from playwright.sync_api import expect

    c = registry.client
    champion = {n: c.get_model_version_by_alias(n, "champion").version for n in MODEL_NAMES}
    challenger = {n: c.get_model_version_by_alias(n, "challenger").version for n in MODEL_NAMES}
    assert champion == dict.fromkeys(MODEL_NAMES, "1") and challenger == dict.fromkeys(MODEL_NAMES, "2")
    open_mlflow(page, f"{registry.url}/#/models", announcement=True)
    expect(page.get_by_role("dialog")).to_have_count(0)  # nothing covers the table
    for name in MODEL_NAMES:
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
        expect(row).to_be_visible()
        aliases = _text(row)
        more = row.get_by_role("button", name="+1")
        if more.count():  # the second alias sits behind "+1"
            more.click()
            menu = page.get_by_role("menu")
            expect(menu).to_be_visible()
            aliases += " " + _text(menu)
            if name != MODEL_NAMES[-1]:
                page.keyboard.press("Escape")  # a person closes the alias menu the same way
                expect(menu).to_be_hidden()
        assert f"@ champion : Version {champion[name]}" in aliases, aliases
        assert f"@ challenger : Version {challenger[name]}" in aliases, aliases
    screenshot(page, "mlflow-registry", tmp_path)

    # The champion's version page: its alias and, as the version's tags, the eval metrics of its pipeline's
    # evaluate run: those the promotion ranks by (tiny_params: psnr, guard codebook_usage; params.yaml:
    # fid_domain, guard class_accuracy).
    name = MODEL_NAMES[0]
    page.get_by_role("link", name=name, exact=True).click()
    page.get_by_role("link", name=f"Version {champion[name]}", exact=True).click()
    expect(page.get_by_text("Source Run")).to_be_visible()
    expect(page.get_by_text("@ champion")).to_be_visible()
    versions = {v: c.get_model_version(name, v) for v in ("1", "2")}
    evaluated = registry.runs[0]["evaluate"].data.metrics
    for key in ("psnr", "codebook_usage", "fid_domain", "class_accuracy"):
        shown = versions["1"].tags[f"{METRIC_TAG}{key}"]
        assert float(shown) == evaluated[key], key
        row = _row(page, f"{METRIC_TAG}{key}")
        expect(row).to_be_visible()
        assert _text(row) == f"{METRIC_TAG}{key} {shown}", _text(row)
    screenshot(page, "mlflow-version", tmp_path)

    # The challenger's page says why it stayed challenger: its description compares it with the champion,
    # metric by metric (flows/compare.py writes 4 significant digits), and its promotion tag gives the reason.
    page.go_back()
    page.get_by_role("link", name=f"Version {challenger[name]}", exact=True).click()
    expect(page.get_by_text("@ challenger")).to_be_visible()
    expect(page.get_by_text(f"Compared with champion v{champion[name]}")).to_be_visible()
    for key in ("psnr", "fid_domain", "class_accuracy", "codebook_usage"):
        row = _row(page, key)
        values = (float(versions[v].tags[f"{METRIC_TAG}{key}"]) for v in ("1", "2"))
        assert _text(row) == " ".join([key, *(f"{v:.4g}" for v in values)]), _text(row)
    ours, theirs = (float(versions[v].tags[f"{METRIC_TAG}psnr"]) for v in ("2", "1"))
    assert ours < theirs
    row = _row(page, DECISION_TAG)
    row.scroll_into_view_if_needed()
    reason = f"kept: psnr {ours:g} does not beat champion's {theirs:g}"
    assert _text(row) == f"{DECISION_TAG} {reason}", _text(row)
    screenshot(page, "mlflow-version-challenger", tmp_path)


# The values a metric's row shows in the run-comparison view, left to right. The view draws its tables as
# virtualised grids (names in one, values in another), so a row is the cells level with the metric's name.
METRIC_ROW = """metric => {
  const link = [...document.querySelectorAll('a[title="Plot chart"]')].find(a => a.textContent.trim() === metric);
  if (!link) return null;
  const cell = link.closest('[role=rowgroup] > div');
  const names = cell.closest('[role=grid]');
  let scope = names.parentElement;
  while (scope && scope.querySelectorAll('[role=grid]').length < 2) scope = scope.parentElement;
  const at = cell.getBoundingClientRect();
  return [...scope.querySelectorAll('[role=grid] [role=rowgroup] > div')]
    .filter(c => !names.contains(c))
    .map(c => [c.getBoundingClientRect(), c.innerText.trim()])
    .filter(([r, t]) => Math.abs(r.top - at.top) < 2 && r.left >= at.right - 1)
    .sort((a, b) => a[0].left - b[0].left).map(([r, t]) => t);
}"""


def _compare_url(registry, stage: str) -> str:
    """The run-comparison view of the two pipeline runs' `stage` runs, first run first."""
    ids = json.dumps([runs[stage].info.run_id for runs in registry.runs])
    return f"{registry.url}/#/compare-runs?runs={ids}&experiments={json.dumps([registry.experiment])}"


def mlflow_format(value: float) -> str:
    """A metric as the MLflow UI writes it (its Utils.formatMetric): 3 decimals under 10, 2 under 100, else 1."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exp = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exp):+d}"
    scale = 1e3 if abs(value) < 10 else 1e2 if abs(value) < 100 else 10
    text = repr(math.floor(value * scale + 0.5) / scale)  # Math.round: halves go up
    return text.removesuffix(".0")


def test_mlflow_compares_two_runs_and_shows_a_sample_grid(page, registry, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    a, b = (runs["evaluate"] for runs in registry.runs)
    open_mlflow(page, _compare_url(registry, "evaluate"))
    expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
    page.get_by_text("Visualizations", exact=True).click()  # fold the plots; the tables come up
    page.get_by_role("link", name="fid_domain", exact=True).wait_for()
    for key in ("fid_domain", "class_accuracy", "codebook_usage"):
        shown = [mlflow_format(run.data.metrics[key]) for run in (a, b)]
        assert page.evaluate(METRIC_ROW, key) == shown, key
    # The evaluate stage's settings are the same in both: "Show diff only" folds them, and the metrics come up.
    page.get_by_role("switch").first.click()
    expect(page.get_by_text("No parameters to display.")).to_be_visible()
    page.get_by_text("Metrics", exact=True).scroll_into_view_if_needed()
    screenshot(page, "mlflow-compare", tmp_path)

    # the setting the two runs differ in, where it was logged: on their train_tokenizer runs
    key, first, second = VARIANT
    open_mlflow(page, _compare_url(registry, "train_tokenizer"))
    expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
    page.get_by_text("Visualizations", exact=True).click()
    page.get_by_role("switch").first.click()  # Parameters: show diff only
    setting = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=key, exact=True))
    expect(setting).to_be_visible()
    assert _text(setting) == f"{key} {first} {second}"
    setting.scroll_into_view_if_needed()
    screenshot(page, "mlflow-compare-setting", tmp_path)

    # the first run's sample grid, among its artifacts, shown as the image it logged
    run = a.info.run_id
    open_mlflow(page, f"{registry.url}/#/experiments/{registry.experiment}/runs/{run}/artifacts")
    page.get_by_text("images", exact=True).click()
    page.get_by_text("samples_per_class.png", exact=True).click()
    image = page.locator("img[src^='blob:']").first
    expect(image).to_be_visible()
    shown = image.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    logged = registry.client.download_artifacts(run, "images/samples_per_class.png", str(tmp_path))
    assert tuple(shown) == Image.open(logged).size
    screenshot(page, "mlflow-artifact", tmp_path)


# ---- Prefect


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """A Prefect server, and `python -m flows.deploy --cron ...` serving retrain/scheduled on it from a
    tiny repository (a git copy of the working tree with micro params, as the orchestration tests make it)
    that tracks to its own `mlflow server`: a click on Run retrains a real pipeline, in seconds of CPU."""
    from tests.integration.test_orchestration_pipeline import _wait_for_deployment, tiny_repo

    root = tmp_path_factory.mktemp("ui-prefect")
    repo = tiny_repo(root / "repo")
    (root / "mlflow").mkdir()
    mlflow_server, mlflow_proc = start_mlflow(root / "mlflow", timeout=300)
    url, proc = servers.start_prefect(root, timeout=300)  # shared, busy cores
    (root / "client").mkdir()
    env = tiny_env(root / "client", mlflow_server.url, "ui-retrain", prefect_api=f"{url}/api")
    log = open(root / "serve.log", "wb")  # noqa: SIM115  (closed below; the child keeps a copy)
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy", "--cron", CRON, "--timezone", TIMEZONE],
        cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()
    ui = SimpleNamespace(prefect=url, env=env, root=root, repo=repo, serve_log=root / "serve.log")
    try:
        ui.deployment = _wait_for_deployment(ui, "retrain/scheduled", serve)
        yield ui
    finally:
        servers.stop(serve, timeout=30)
        servers.stop(proc, timeout=20)
        servers.stop(mlflow_proc)


def _flow_runs(ui, deployment_id, timeout: float = 0):
    """The deployment's flow runs, soonest first; waits up to `timeout` s for the scheduler to make one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    from tests.integration.test_orchestration_pipeline import _prefect

    deadline = time.monotonic() + timeout
    while True:
        with _prefect(ui), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            )
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(2)


def _deployment_page(page, ui, name: str, deployment_id=None):
    """The deployment's page: through the Deployments list, or straight at its address."""
    from playwright.sync_api import expect

    if deployment_id:
        page.goto(f"{ui.prefect}/deployments/deployment/{deployment_id}")
    else:
        page.goto(f"{ui.prefect}/deployments", wait_until="networkidle")
        page.get_by_role("link", name=name, exact=True).first.click()
    expect(page.get_by_text(name, exact=True).first).to_be_visible()
    expect(page.get_by_role("button", name="Run", exact=True)).to_be_visible()


def test_prefect_deployment_page_shows_cron_schedule_and_next_run(page, prefect_ui, tmp_path):
    from playwright.sync_api import expect

    runs = _flow_runs(prefect_ui, prefect_ui.deployment.id, timeout=120)
    assert runs and runs[0].state.is_scheduled()
    when = runs[0].expected_start_time  # what the API holds; the page (in UTC) must show the same
    _deployment_page(page, prefect_ui, "scheduled")
    expect(page.get_by_text("Next Run", exact=True)).to_be_visible()
    expect(page.get_by_text("Can't connect to Server API")).to_have_count(0)
    expect(page.get_by_role("link", name=runs[0].name)).to_be_visible()
    expect(page.get_by_text(f"Scheduled for {when.strftime('%Y/%m/%d %I:%M:%S %p')}")).to_be_visible()
    schedule = page.locator(".deployment-schedule-card__content")
    expect(schedule).to_have_text("At 04:17 AM, only on Tuesday")
    schedule.hover()
    expect(page.get_by_role("tooltip")).to_contain_text(f"({TIMEZONE})")
    screenshot(page, "prefect-deployment", tmp_path)
    # the cron expression itself is in the schedule's edit form; close it unsaved
    page.locator(".deployment-schedule__menu button").click()
    page.get_by_text("Edit", exact=True).first.click()
    expect(page.get_by_text("Edit schedule", exact=True)).to_be_visible()
    expect(page.locator("input[type=text] >> nth=-1")).to_have_value(CRON)
    screenshot(page, "prefect-schedule", tmp_path)
    page.locator(".p-modal").get_by_role("button", name="Close", exact=True).last.click()
    expect(page.get_by_text("Edit schedule", exact=True)).to_be_hidden()


def _final_state(ui, flow_run_id, timeout: float):
    """The flow run once its state is final (Completed, Failed, Crashed...), polled through the API."""
    from prefect.client.orchestration import get_client

    from tests.integration.test_orchestration_pipeline import _prefect

    deadline = time.monotonic() + timeout
    while True:
        with _prefect(ui), get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
        if run.state.is_final() or time.monotonic() > deadline:
            return run
        time.sleep(3)


RETRAIN_TASKS = ("log_model", "register", "promote")  # publish's three tasks, after the pipeline subflow


def _subflow_runs(ui, flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    from tests.integration.test_orchestration_pipeline import _prefect

    only = FlowRunFilter(parent_flow_run_id={"any_": [flow_run_id]})
    with _prefect(ui), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=only)


def test_prefect_run_button_retrains_and_its_page_shows_the_tasks_completed(page, prefect_ui, tmp_path):
    """Run -> Quick run on the served retrain/scheduled deployment: the serving process runs the tiny
    pipeline through DVC, publishes and promotes, and the flow run's page shows each task Completed; its
    pipeline subflow's page shows one task per dvc.yaml stage, each Completed."""
    import re

    import yaml
    from playwright.sync_api import expect

    deployment = prefect_ui.deployment
    before = {r.id for r in _flow_runs(prefect_ui, deployment.id)}
    _deployment_page(page, prefect_ui, "scheduled", deployment.id)
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Quick run", exact=True).click()
    expect(page.get_by_text("scheduled to start now").first).to_be_visible()
    # one new run, made by the click (not by the schedule), and it is the one the toast names
    [run] = [r for r in _flow_runs(prefect_ui, deployment.id) if r.id not in before and not r.auto_scheduled]
    expect(page.get_by_text(f"{run.name} scheduled to start now").first).to_be_visible()
    screenshot(page, "prefect-run", tmp_path)

    final = _final_state(prefect_ui, run.id, timeout=1200)
    assert final.state.is_completed(), (final.state, prefect_ui.serve_log.read_text()[-3000:])
    page.goto(f"{prefect_ui.prefect}/runs/flow-run/{run.id}")
    expect(page.get_by_text(run.name, exact=True).first).to_be_visible()
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    page.get_by_text("Task Runs", exact=True).click()
    page.get_by_text(re.compile(r"^log_model-")).first.wait_for()
    for task in RETRAIN_TASKS:
        link = page.get_by_role("link", name=re.compile(rf"^{task}-"))
        expect(link.first).to_be_visible()
        card = page.locator(".state-list-item").filter(has=link.first)
        expect(card.get_by_text("Completed", exact=True)).to_be_visible()
    screenshot(page, "prefect-run-completed", tmp_path)
    [pipeline] = _subflow_runs(prefect_ui, run.id)
    page.goto(f"{prefect_ui.prefect}/runs/flow-run/{pipeline.id}")
    expect(page.get_by_text(pipeline.name, exact=True).first).to_be_visible()
    page.get_by_text("Task Runs", exact=True).click()
    for stage in yaml.safe_load((prefect_ui.repo / "dvc.yaml").read_text())["stages"]:
        link = page.get_by_role("link", name=stage, exact=True)
        expect(link.first).to_be_visible()
        card = page.locator(".state-list-item").filter(has=link.first)
        expect(card.get_by_text("Completed", exact=True)).to_be_visible()
    screenshot(page, "prefect-pipeline-tasks", tmp_path)
    # and the click's retrain registered its models: the tiny repo's registry has a champion
    from mlflow import MlflowClient

    uri = prefect_ui.env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry URI an earlier test set
    for name in MODEL_NAMES:
        assert client.get_model_version_by_alias(name, "champion").version == "1"
