#!/bin/bash
# The dynamic-freezing cells of bench/RESULTS.md §4.10 on one GPU: what the 2-core CPU
# could not finish (dynamic SALF and every dynamic baseline at seeds 1-3: a GPU cell takes
# about a minute, so the baselines get all three seeds, not only where they come near) at the
# published settings (SmolLM2-135M, 120 steps, batch 16, <=96 tokens, lr 5e-5, fp32),
# then the 3x longer runs (360 steps, seed 1): full fine-tuning, the oracle's cheapest
# safe static cut of the 120-step sweep, the default's static pick and dynamic SALF.
#
#   bash bench/gpu_dynamic.sh OUT_ROOT [JOBS]
#
# Writes OUT_ROOT/sweep-smollm2-135m-<dataset>-dyn/ (120 steps; starts from a copy of the
# CPU sweep's analysis and cells, so only the missing cells train) and
# OUT_ROOT/sweep-smollm2-135m-<dataset>-360/ (360 steps). Each is a resumable `salf sweep`
# folder: rerun to continue. The three datasets run side by side, JOBS cells each (default 3).
# Then: python bench/dynamic_verdict.py OUT_ROOT/sweep-smollm2-135m-*-{dyn,360}
set -u
OUT_ROOT=${1:?usage: bash bench/gpu_dynamic.sh OUT_ROOT [JOBS]}
JOBS=${2:-3}
PY=${PYTHON:-python3}
BASELINES=dyn-linear,dyn-autofreeze,dyn-freezeout
# dataset : the default's static pick (dynamic SALF starts there) : the oracle's cheapest safe cut (§4.5)
PLAN="rotten-tomatoes:4:8 bbc-news:2:20 chatterbot:0:0"

"$PY" -m salf models prepare smollm2-135m > /dev/null || exit 1
mkdir -p "$OUT_ROOT"
for entry in $PLAN; do
    IFS=: read -r ds start oracle <<< "$entry"
    "$PY" -m salf datasets show "$ds" > /dev/null || exit 1
    src=bench/results/sweep-smollm2-135m-$ds
    dyn=$OUT_ROOT/sweep-smollm2-135m-$ds-dyn
    long=$OUT_ROOT/sweep-smollm2-135m-$ds-360
    mkdir -p "$dyn/cells" "$long"
    [ -d "$dyn/analysis" ] || cp -r "$src/analysis" "$dyn/"
    [ -d "$long/analysis" ] || cp -r "$src/analysis" "$long/"
    cp -n "$src"/cells/*.json "$dyn/cells/" 2>/dev/null
    (
        "$PY" -m salf sweep --model smollm2-135m --dataset "$ds" --cuts "$start" \
            --selectors dyn-salf --seeds 1,2,3 --jobs "$JOBS" --out "$dyn" || exit 1
        "$PY" -m salf sweep --model smollm2-135m --dataset "$ds" --cuts "$start" \
            --selectors "$BASELINES" --seeds 1,2,3 --jobs "$JOBS" --out "$dyn" || exit 1
        "$PY" -m salf sweep --model smollm2-135m --dataset "$ds" --cuts "$start,$oracle" \
            --selectors dyn-salf --seeds 1 --budget-steps 360 --jobs "$JOBS" --out "$long" || exit 1
    ) > "$dyn.log" 2>&1 &
done
wait
