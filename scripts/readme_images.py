"""Regenerate docs/img/ (see docs/operations.md): the UIs as the browser tests saw them, and the pipeline's plots.

mlflow-compare.png is not among them: it shows two real runs, from scripts/compare_picture.py.

    python scripts/readme_images.py                # run tests/integration/test_ui_browser.py, then take its screenshots
    python scripts/readme_images.py --from DIR     # take screenshots saved before (VIM_SCREENSHOT_DIR=DIR)

The browser tests need Debian's chromium (apt-get install chromium) and start their own servers on
127.0.0.1. The plots are copies of the pipeline's plots/ (run dvc repro first). Every picture is written
atomically and kept under MAX_BYTES, with fewer colours and then a smaller size if need be.
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vim_core.io import atomic_write_bytes  # noqa: E402  (after the path, when run as a script)

OUT = REPO / "docs" / "img"
MAX_BYTES = 300_000
# docs/img name -> the browser test's screenshot that shows it
SCREENSHOTS = {
    "prefect-deployment.png": "prefect-deployment.png",
    "mlflow-registry.png": "mlflow-registry.png",
    "prefect-run-completed.png": "prefect-run-completed.png",
}
PLOTS = {
    "samples_per_class.png": "plots/samples_per_class.png",
    "reconstructions.png": "plots/reconstructions.png",
}


def take_screenshots(dest: Path) -> None:
    """Run the browser tests with VIM_SCREENSHOT_DIR=dest."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "slow", "tests/integration/test_ui_browser.py"]
    env = {**os.environ, "VIM_SCREENSHOT_DIR": str(dest), "PYTHONPATH": str(REPO)}
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        sys.exit("error: the browser tests failed; no pictures were changed")


def small_png(src: Path, max_bytes: int = MAX_BYTES) -> bytes:
    """src as a PNG of at most max_bytes: as is if it fits, else 256 colours, else scaled down too."""
    data = src.read_bytes()
    if len(data) <= max_bytes:
        return data
    with Image.open(src) as im:
        image = im.convert("RGB")
    while True:
        buf = io.BytesIO()
        image.quantize(256).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or image.width < 200:
            return buf.getvalue()
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from", dest="shots", type=Path, help="screenshots taken before, instead of a test run"
    )
    args = parser.parse_args(argv)
    sources = {name: REPO / rel for name, rel in PLOTS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        shots = args.shots or Path(tmp)
        if args.shots is None:
            take_screenshots(shots)
        sources.update({name: shots / shot for name, shot in SCREENSHOTS.items()})
        missing = [str(p) for p in sources.values() if not p.is_file()]
        if missing:
            print(f"error: missing {', '.join(missing)}", file=sys.stderr)
            return 1
        for name, src in sources.items():
            data = small_png(src)
            atomic_write_bytes(OUT / name, data)
            print(f"{OUT.relative_to(REPO) / name}: {len(data) // 1000} KB from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
