"""The statistics of sweep.json: each configuration's mean and spread over seeds, full
fine-tuning's noise, the paired verdict ("safe") against it, the frontier and the oracle's
cheapest safe cut (docs/sweep.md). Pure functions of the cells."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .cells import cell_kind, cell_stem

SAFE_RULE = ("quality minus full fine-tuning's at the same seeds (paired) within full's noise "
             "(max of the seed std and the standard error on the test rows: binomial for "
             "accuracy, ratio-estimator for a mean loss) and >= 99% of full (<= 101% for loss)")

# What a pick's row in pick_details copies from its measurement, in sweep.json's order: a
# cut's from its frontier point, any other pick's (a layer set's) from its own cells.
CUT_PICK_FIELDS = ("quality", "spread", "cost", "safe", "seeds", "delta_vs_full")

OTHER_PICK_FIELDS = ("quality", "spread", "cost", "seeds", "delta_vs_full", "paired_seeds", "safe")


@dataclass(frozen=True)
class Reference:
    """Full fine-tuning as every other cell is judged against it (docs/sweep.md, "safe")."""
    by_seed: dict[int, float]   # its quality at each seed it ran
    quality: float              # the mean over those seeds
    noise: float                # noise_floor
    higher: bool                # accuracy; False for a loss


def _mean_spread(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def quality_metric(cells: list[dict]) -> str:
    """What a cell's quality is: "accuracy" (classification) or "loss" (SFT)."""
    return "loss" if cells and cells[0].get("accuracy") is None else "accuracy"


def group_cells(cells: list[dict]) -> dict[str, list[dict]]:
    """Cells by what they trained (cell_stem), each group in the order given."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(cell_stem(c), []).append(c)
    return groups


def full_row(full_cells: list[dict]) -> dict:
    q, s = _mean_spread([c["quality"] for c in full_cells])
    return {"quality": q, "spread": s, "cost": 1.0, "seeds": len(full_cells),
            "loss": _mean_spread([c["loss"] for c in full_cells])[0],
            "step_s": _mean_spread([c["step_s"] for c in full_cells if c["step_s"]])[0],
            "peak_mb": _mean_spread([c["peak_mb"] for c in full_cells if c["peak_mb"]])[0]}


def noise_floor(full_cells: list[dict], full: dict, higher: bool, test_samples: int) -> float:
    """Full fine-tuning's noise: its seed spread, and at least the standard error of its
    quality on the test rows (what one seed cannot show): binomial for accuracy, the
    ratio-estimator SE recorded by evaluate for a mean loss."""
    if not full_cells:
        return 0.0
    if higher and test_samples:
        n = full_cells[0].get("test_rows") or test_samples  # fewer when the split is smaller
        se = math.sqrt(max(full["quality"] * (1 - full["quality"]), 0.0) / n)
    else:
        se = _mean_spread([c["loss_se"] for c in full_cells if c.get("loss_se")])[0]
        se = 0.0 if math.isnan(se) else se
    return max(full["spread"], se)


def measure(group: list[dict]) -> dict:
    """Mean and spread over the seeds of one training configuration's cells."""
    q, s = _mean_spread([c["quality"] for c in group])
    # a static cut costs the same at every seed; a moving cut's schedule, hence cost, differs
    return {"cost": statistics.fmean(c["cost"] for c in group), "quality": q, "spread": s,
            "loss": _mean_spread([c["loss"] for c in group])[0],
            "step_s": _mean_spread([c["step_s"] for c in group if c["step_s"]])[0],
            "seeds": len(group)}


def judge(mine: list[dict], ref: Reference) -> dict:
    """The paired verdict on one configuration's cells. They are compared with full
    fine-tuning at the seeds they share with it (same data order, same test rows), so a
    run at fewer seeds than full is not judged against seeds it never saw."""
    paired = [c for c in mine if c["seed"] in ref.by_seed]
    base = statistics.fmean(ref.by_seed[c["seed"]] for c in paired) if paired else ref.quality
    delta = (statistics.fmean(c["quality"] for c in paired) if paired
             else _mean_spread([c["quality"] for c in mine])[0]) - base
    if not ref.by_seed:
        safe = None
    elif ref.higher:
        safe = delta >= -ref.noise and base + delta >= 0.99 * base
    else:
        safe = delta <= ref.noise and base + delta <= 1.01 * base
    return {"delta_vs_full": delta, "paired_seeds": sorted(c["seed"] for c in paired),
            "safe": safe}


def cut_points(groups: dict[str, list[dict]], ref: Reference) -> list[dict]:
    """The frontier: every measured cut, in order, with its measurement and verdict."""
    cuts = sorted((g for g in groups.values() if cell_kind(g[0]) == "cut"),
                  key=lambda g: g[0]["cut"])
    return [{"cut": g[0]["cut"], **measure(g), **judge(g, ref)} for g in cuts]


def pick_row(pick: dict, groups: dict[str, list[dict]], points: list[dict],
             cheapest: dict | None, ref: Reference) -> dict:
    """A selector's pick with what its cells measured (nothing while none has run)."""
    row = dict(pick)
    if cell_kind(pick) == "cut":
        measured = next((p for p in points if p["cut"] == pick["cut"]), None)
        fields = CUT_PICK_FIELDS
    else:
        group = groups.get(cell_stem(pick))
        measured = {**measure(group), **judge(group, ref)} if group else None
        fields = OTHER_PICK_FIELDS
    if measured:
        row.update({k: measured[k] for k in fields})
        if cheapest:
            row["cost_vs_cheapest_safe"] = measured["cost"] / cheapest["cost"]
    if cell_kind(pick) == "dyn" and groups.get(cell_stem(pick)):
        # each seed's cut schedule [[step, eof], ...] and the cost it integrates to ("cost": their mean)
        row["schedules"] = {str(c["seed"]): c["dynamic"]["schedule"] for c in groups[cell_stem(pick)]}
        row["costs"] = {str(c["seed"]): c["cost"] for c in groups[cell_stem(pick)]}
    return row


def cheapest_safe(points: list[dict]) -> dict | None:
    """The oracle's cut: the cheapest safe point of the frontier, what a selector should find."""
    safe = [p for p in points if p["safe"]]
    return min(safe, key=lambda p: p["cost"]) if safe else None


def oracle(cheapest: dict | None, noise: float) -> dict:
    return {"cheapest_safe_cut": cheapest["cut"] if cheapest else None,
            "cheapest_safe_cost": cheapest["cost"] if cheapest else None,
            "safe_rule": SAFE_RULE, "noise": noise}
