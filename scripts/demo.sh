#!/usr/bin/env bash
# Install (idempotently) and run the main job on the built-in offline default:
# analyze SmolLM2-135M on rotten-tomatoes, freeze below the chosen cut, fine-tune, evaluate.
# Extra arguments go to `salf finetune` (e.g. --lora, --policy budget=0.4, --max-steps 60).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/salf finetune --model smollm2-135m --dataset rotten-tomatoes --out runs/demo "$@"
