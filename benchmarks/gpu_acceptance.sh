#!/usr/bin/env bash
# The GPU acceptance check: one command, under 8 minutes on an H100/H200 (benchmarks/README.md).
#   bash benchmarks/gpu_acceptance.sh [--out DIR] [--smoke] [--budget-s 450]
# One JSON object on stdout (and in DIR/gpu_acceptance.json), logs on stderr; exit 1 if a part failed,
# 2 without CUDA unless --smoke. PYTHON picks the interpreter (default: python, else python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m benchmarks.gpu_acceptance "$@"
