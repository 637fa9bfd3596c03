"""Printed at the end of `make demo`: where the results are and how to look at them."""

import json
import os
from pathlib import Path

from flows.stages import all_declared


def main() -> None:
    print("\nvim pipeline finished.")
    stages = all_declared()
    for path in sorted(Path(file) for stage in stages for file in stage.metrics if Path(file).is_file()):
        data = json.loads(path.read_text())
        flat = {
            k: v
            for k, v in data.items()
            if isinstance(v, int | float) or (isinstance(v, str) and len(v) < 40)
        }
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(flat.items())[:8]
        )
        print(f"  {path}: {shown}")
    plots = sorted({stage.plots_dir for stage in stages if stage.plots})
    print(f"  plots:    {', '.join(f'{p}/' for p in plots)}   (dvc plots show)")
    print("  compare:  dvc metrics show / dvc metrics diff")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        print(f"  MLflow:   runs are on {uri}; open that server's UI")
    else:
        print(
            "  MLflow:   .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  ->  http://127.0.0.1:5000"
        )
    print("  Prefect:  .venv/bin/prefect server start  ->  http://127.0.0.1:4200")
    print("            (then export PREFECT_API_URL=http://127.0.0.1:4200/api before dvc repro)")
    print("  publish:  .venv/bin/python -m flows.publish   (register challengers, promote the better one)")


if __name__ == "__main__":
    main()
