"""Printed at the end of `make demo`: where the results are and how to look at them."""

import json
from pathlib import Path


def main() -> None:
    print("\nvim pipeline finished.")
    for path in sorted(Path("metrics").glob("*.json")):
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
    print("  plots:    plots/   (dvc plots show)")
    print("  compare:  dvc metrics show / dvc metrics diff")


if __name__ == "__main__":
    main()
