#!/usr/bin/env bash
# Create/refresh the repo-local venv (.venv) with salf and its pinned dependencies.
# Idempotent: does nothing when requirements.lock, pyproject.toml and $SALF_TORCH are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SALF_TORCH:-torch==2.13.0}
stamp=.venv/.salf-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)-$TORCH_SPEC
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import salf" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
echo "salf: installing $TORCH_SPEC and requirements.lock into .venv (first run takes a few minutes)" >&2
pip install "$TORCH_SPEC"
pip install -r requirements.lock
pip install --no-deps -e .
echo "$want" > "$stamp"
