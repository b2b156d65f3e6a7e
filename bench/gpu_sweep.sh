#!/bin/bash
# The sweep of bench/RESULTS.md §4, replicated on one GPU with the same settings
# (SmolLM2-135M, 120 steps, batch 16, <=96 tokens, lr 5e-5, 1,000 test rows,
# fp32), a denser grid of cuts, every selector and three seeds.
#
#   bash bench/gpu_sweep.sh OUT_ROOT [JOBS]
#
# Writes OUT_ROOT/sweep-smollm2-135m-<dataset>-h200/ for rotten-tomatoes,
# bbc-news and chatterbot (each a resumable `salf sweep` folder: rerun to
# continue). The three datasets run side by side, JOBS cells each (default 4):
# a 135M model keeps a large GPU mostly idle, so cells share it.
#
# Each sweep starts from the CPU sweep's analysis (bench/results/.../analysis),
# so SALF's picks are the CPU sweep's picks. The decisive cuts run first at all
# seeds, then the rest of the grid: a run stopped early still has them.
set -u
OUT_ROOT=${1:?usage: bash bench/gpu_sweep.sh OUT_ROOT [JOBS]}
JOBS=${2:-4}
PY=${PYTHON:-python3}
FIRST=0,2,4,8,15,22
GRID=0,2,4,8,11,13,15,18,20,22,24,26,28,29
SELECTORS=max-gain,max-gain-e0,paper,onset,knee,freeze-half,grad-norm,block-influence-cut,spectrum

# provision once, before three sweeps race for the same cache folders
"$PY" -m salf models prepare smollm2-135m > /dev/null || exit 1
mkdir -p "$OUT_ROOT"
for ds in rotten-tomatoes bbc-news chatterbot; do
    "$PY" -m salf datasets show "$ds" > /dev/null || exit 1
    dir=$OUT_ROOT/sweep-smollm2-135m-$ds-h200
    mkdir -p "$dir"
    [ -d "$dir/analysis" ] || cp -r "bench/results/sweep-smollm2-135m-$ds/analysis" "$dir/"
    (
        for cuts in $FIRST $GRID; do
            "$PY" -m salf sweep --model smollm2-135m --dataset "$ds" --cuts "$cuts" \
                --selectors "$SELECTORS" --seeds 1,2,3 --jobs "$JOBS" --out "$dir" || exit 1
        done
    ) > "$dir.log" 2>&1 &
done
wait
