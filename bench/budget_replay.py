"""What salf-budget's evidence says on a finished run's training-loss curve, check by check.

Replays `salf.dynamic.budget.training_law` on the per-step training losses a sweep cell
recorded (`train_loss_curve`), with the linear learning-rate decay the published runs use
(the lr-area clock), and prints at each step asked: the loss level, R (the improvement
still ahead, an upper bound) and the share ρ a move may freeze there (tolerance x level /
R). No training: it shows when the budget would let a probe read move the cut.

    python bench/budget_replay.py bench/results/sweep-smollm2-135m-rotten-tomatoes/cells/dyn-salf-s1.json \
        --steps 12,24,36,48,60,72,96
"""

from __future__ import annotations

import argparse
import json
import math

from salf.dynamic import DynamicSettings
from salf.analysis.gains import fit_power_law
from salf.dynamic.budget import law_points, training_law
from salf.dynamic.policies import RunShape


def replay(curve: list[float], steps: list[int], tolerance: float) -> list[dict]:
    total = len(curve)
    multipliers = [(total - s) / total for s in range(total)]      # linear decay to 0
    clock = [sum(multipliers[:s]) for s in range(total + 1)]
    rows = []
    for step in steps:
        run = RunShape(num_layers=1, total_steps=total, total_progress=clock[total], max_eof=0,
                       multipliers=multipliers,
                       train_losses=[(s, clock[s], curve[s - 1]) for s in range(1, step + 1)])
        law = training_law(run, step)
        if "ready" not in law:
            rows.append({"step": step, "reason": law["reason"]})
            continue
        allowed = math.inf if law["remaining"] <= 0 else tolerance * law["level"] / law["remaining"]
        rows.append({"step": step, "level": law["level"], "remaining": law["remaining"], "allowed": allowed,
                     "power_law_remaining": power_law_remaining(run, step)})
    return rows


def power_law_remaining(run: RunShape, step: int) -> float:
    """The first formulation's R: a power law E + A·x^(-α) fitted to the same losses,
    ℓ̂(x_now) - ℓ̂(x_T) (docs/method.md says why it was dropped)."""
    xs, ys = zip(*law_points(run))
    fit = fit_power_law(xs, ys)
    law = lambda x: fit["E"] + fit["A"] * x ** (-fit["alpha"])  # noqa: E731
    return max(0.0, law(run.clock(step)) - law(run.total_progress))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="+", help="sweep cell JSON files with a train_loss_curve")
    ap.add_argument("--steps", default="12,24,36,48,60,72,96")
    ap.add_argument("--tolerance", type=float, default=DynamicSettings().tolerance)
    args = ap.parse_args(argv)
    steps = [int(x) for x in args.steps.split(",")]
    for path in args.cells:
        curve = json.load(open(path))["train_loss_curve"]
        print(f"{path} ({len(curve)} steps)")
        for r in replay(curve, [s for s in steps if s < len(curve)], args.tolerance):
            print(f"  step {r['step']:4d}: " + (r["reason"] if "reason" in r else
                  f"level {r['level']:.3f}, R {r['remaining']:.3f}, share allowed {r['allowed']:.2f} "
                  f"(a power law's R: {r['power_law_remaining']:.3f})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
