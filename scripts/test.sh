#!/usr/bin/env bash
# Install (idempotently), lint (ruff), and run the default test suite: unit tests on tiny random models
# of many families + integration tests on the real built-in model and datasets.
# Extra arguments go to pytest (e.g. scripts/test.sh -m slow for sweeps/benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
.venv/bin/ruff check --quiet src tests bench   # the rules in pyproject.toml [tool.ruff]
exec .venv/bin/python -m pytest -q "$@"
