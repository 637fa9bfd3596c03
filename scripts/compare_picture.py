"""docs/img/mlflow-compare*.png from real runs: MLflow's compare view of two runs (by default, the evaluate
stages of the two latest pipeline runs).

    python scripts/compare_picture.py --tracking-uri sqlite:///PATH/mlflow.db \
        --artifacts PATH/mlartifacts [--runs RUN_A RUN_B] [--metric fid_domain] \
        [--out docs/img/mlflow-compare.png]

--metric names a metric both runs log (the page is ready when its row shows): rfid_domain for
evaluate_tokenizer runs, best_val_loss for training runs.

Without --runs it takes the evaluate runs of the two latest pipeline runs that finished. It serves the
tracking store with `mlflow server` on 127.0.0.1, opens the compare view in headless Chromium (Debian's
`chromium`, driven by Playwright; nothing is downloaded), folds the plots, keeps only the parameters that
differ, and writes the screenshot atomically, under the same size cap as scripts/readme_images.py.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.readme_images import small_png  # noqa: E402  (after the path, when run as a script)
from vim_core.io import atomic_write_bytes  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_evaluate_runs(uri: str, count: int = 2) -> tuple[str, list[str]]:
    """(experiment id, the evaluate stage runs of the `count` latest finished evaluate runs, oldest first)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="attributes.run_name = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=count,
    )
    if len(runs) < count:
        raise SystemExit(f"error: {uri} holds {len(runs)} finished evaluate runs, {count} needed")
    return runs[0].info.experiment_id, [r.info.run_id for r in reversed(runs)]


def serve(uri: str, artifacts: str, port: int) -> subprocess.Popen:
    cmd = [shutil.which("mlflow") or "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", uri, "--artifacts-destination", artifacts, "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: mlflow server did not answer /health within 90 s")


def shoot(url: str, path: Path, metric: str = "fid_domain") -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("VIM_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        raise SystemExit("error: no chromium: apt-get install chromium (or set VIM_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1200})
        page.goto(url)
        page.get_by_text("Comparing 2 Runs").wait_for(timeout=60_000)
        close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
        try:
            close.wait_for(timeout=5_000)
            close.click()
        except PlaywrightTimeout:
            pass  # no assistant panel in this version
        page.get_by_text("Visualizations", exact=True).click()  # fold the plots; the tables come up
        page.get_by_role("link", name=metric, exact=True).wait_for()
        page.get_by_role("switch").first.click()  # parameters: show the differences only
        # the parameters that differ, then the metrics: the view starts at the Parameters heading
        page.get_by_text("Parameters", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
        page.screenshot(path=str(path), animations="disabled")
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:///path/to/mlflow.db")
    parser.add_argument("--artifacts", required=True, help="the store's artifact folder (mlartifacts)")
    parser.add_argument("--runs", nargs=2, metavar="RUN_ID", help="two evaluate run ids (default: latest)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "mlflow-compare.png")
    parser.add_argument(
        "--metric", default="fid_domain", help="a metric both runs log, waited for (e.g. rfid_domain)"
    )
    args = parser.parse_args(argv)
    if args.runs:
        from mlflow import MlflowClient

        experiment = MlflowClient(tracking_uri=args.tracking_uri).get_run(args.runs[0]).info.experiment_id
        runs = list(args.runs)
    else:
        experiment, runs = latest_evaluate_runs(args.tracking_uri)
    port = free_port()
    server = serve(args.tracking_uri, args.artifacts, port)
    try:
        url = f"http://127.0.0.1:{port}/#/compare-runs?runs={json.dumps(runs)}&experiments={json.dumps([experiment])}"
        with tempfile.TemporaryDirectory() as tmp:
            shot = Path(tmp) / "compare.png"
            shoot(url, shot, args.metric)
            atomic_write_bytes(args.out, small_png(shot))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out} (runs {', '.join(runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
