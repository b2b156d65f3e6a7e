"""`salf-budget`: the second-generation controller — freeze what the rest of the run can spare.

The first controller (`salf`, kept as it was) moves once the probe's loss law is past its knee
and the low spaces have settled, with thresholds set on 120-step runs. This one asks, at every
check, what freezing layers (k, k'] would cost the rest of *this* run and what it would save:

* **The step law on the training loss** that every step computes anyway: ℓ(x) = E + A·x^(-α)
  fitted to the per-step training losses on the settings' clock (lr-area by default). It gives
  the improvement the run has made so far, G, and the improvement still ahead, R = ℓ̂(x_now) −
  ℓ̂(x_T) — small when the run is short, late, or saturated; large early in a long run.
* **The loss budget.** Over the whole run the moves may give up at most `tolerance` × (G + R)
  of loss — a fraction of the run's predicted total improvement. Freezing layers (k, k′] gives
  up ≈ ρ(k′)·R, where ρ(k′) is how far space k′ moved relative to the output space over the
  last probe interval (their share of the recent semantic movement, the probe's signal (a)).
  The deepest contiguous k′ whose cost fits what is left of the budget is the candidate. Long
  runs (large R) therefore freeze later or shallower, saturated runs (R ≈ 0) early and deep.
* **The saving floor.** A move must save at least `min_saving` of the run's full fine-tuning
  FLOPs over the steps that remain (the cost model's per-step cost at each cut), or it is not
  worth its risk.
* **Probes on demand.** The probe (the only evidence that costs a forward pass) is read only
  when the budget could allow a move (`probe_wanted`), and never beyond `probe_budget` of the
  run's FLOPs (the callback enforces that).
* **The undo guard.** After a move the next checks compare the training loss since the move
  with what the law fitted before the move predicted; a regression beyond GUARD_Z standard
  errors moves the cut back to where it was (the layers rejoin training with fresh optimizer
  state), and the run never freezes past that cut again.

Pure functions over the history, like every policy (salf.dynamic.policies); docs/method.md,
"The budget-aware controller", gives the rule and why.
"""

from __future__ import annotations

import math

from ..analysis.gains import fit_power_law
from .policies import Check, Decision, RunShape, settled_shares

GUARD_Z = 3.0            # standard errors of the mean loss since a move before the guard acts
GUARD_MIN_STEPS = 8      # losses since the move the guard needs before it judges
READ_SHARE = 0.05        # the least share ρ the budget must allow before a probe read is worth it
MIN_LAW_SHARE = 0.05     # the law is fitted once this share of the run (and >= 8 steps) has losses


def law_points(run: RunShape, upto: int | None = None) -> list[tuple[float, float]]:
    """(clock, loss) of each step's training loss up to step `upto` (all without it)."""
    return [(x, y) for s, x, y in run.train_losses if upto is None or s <= upto]


def training_law(run: RunShape, step: int, upto: int | None = None) -> dict:
    """The step law on the training losses logged up to `upto` (default: all so far), read at
    `step`: {"fit", "so_far" G, "remaining" R, "total" G + R, "reason"} or {"reason"} alone when
    there are too few losses."""
    points = law_points(run, upto)
    needed = max(8, math.ceil(MIN_LAW_SHARE * run.total_steps))
    if len(points) < needed:
        return {"reason": f"{len(points)} training losses, the law needs {needed}"}
    xs, ys = zip(*points)
    if min(xs) <= 0:
        return {"reason": "no training progress recorded yet"}
    fit = fit_power_law(xs, ys)
    law = lambda x: fit["E"] + fit["A"] * x ** (-fit["alpha"])  # noqa: E731
    x_now = run.clock(step)
    remaining = max(0.0, law(x_now) - law(run.total_progress))
    so_far = max(0.0, law(xs[0]) - law(x_now))
    sigma = math.sqrt(fit["sse"] / max(len(points) - 3, 1))
    return {"fit": {k: fit[k] for k in ("E", "A", "alpha", "r2")}, "sigma": sigma,
            "so_far": so_far, "remaining": remaining, "total": so_far + remaining,
            "reason": (f"training-loss law: {so_far:.4f} gained, {remaining:.4f} still ahead "
                       f"(R² {fit['r2']:.2f})")}


def budget_left(settings, history: list[Check], law: dict) -> float:
    """The loss the moves may still give up: tolerance x (G + R) less what moves gave up."""
    spent = sum(c.given_up or 0.0 for c in history)
    return settings.tolerance * law["total"] - spent


def share_allowed(settings, history: list[Check], law: dict) -> float:
    """The largest ρ a move may freeze now: the budget left over the improvement ahead."""
    left = budget_left(settings, history, law)
    if left <= 0:
        return 0.0
    return math.inf if law["remaining"] <= 1e-12 else left / law["remaining"]


def ceiling(history: list[Check], run: RunShape) -> int:
    """The deepest cut still allowed: after an undo, never past the cut it went back to."""
    undone = [c.eof for prev, c in zip(history, history[1:]) if c.eof < prev.eof]
    return min([run.max_eof, *undone])


def probe_wanted(settings, history: list[Check], run: RunShape) -> bool:
    """Whether this check should read the probe: the law is ready, the budget allows a share
    of at least READ_SHARE, and the cut can still go deeper."""
    now = history[-1]
    if now.eof >= ceiling(history, run):
        return False
    law = training_law(run, now.step)
    return "fit" in law and share_allowed(settings, history, law) >= READ_SHARE


def saving(run: RunShape, step: int, k: int, deeper: int) -> float:
    """FLOPs saved over the steps left by training at cut `deeper` instead of `k`, as a
    fraction of the run's full fine-tuning FLOPs."""
    left = (run.total_steps - step) / run.total_steps
    return (run.cut_cost[k] - run.cut_cost[deeper]) * left


def guard(history: list[Check], run: RunShape) -> dict | None:
    """Since the last move (if any, and not undone): the mean training loss against the law
    fitted before it. Returns the comparison when the guard can judge."""
    moves = [(prev, c) for prev, c in zip(history, history[1:]) if c.eof != prev.eof]
    if not moves:
        return None
    before, after = moves[-1]
    if after.eof < before.eof:
        return None                                    # the last change was an undo
    moved_at = before.step
    law = training_law(run, moved_at, upto=moved_at)
    since = [(x, y) for s, x, y in run.train_losses if s > moved_at]
    if "fit" not in law or len(since) < GUARD_MIN_STEPS:
        return None
    fit = law["fit"]
    predicted = sum(fit["E"] + fit["A"] * x ** (-fit["alpha"]) for x, _ in since) / len(since)
    observed = sum(y for _, y in since) / len(since)
    se = law["sigma"] / math.sqrt(len(since))
    return {"moved_at": moved_at, "from": before.eof, "to": after.eof, "observed": observed,
            "predicted": predicted, "se": se, "steps": len(since),
            "regressed": observed - predicted > GUARD_Z * se}


def decide_salf_budget(settings, history: list[Check], run: RunShape) -> Decision:
    now = history[-1]
    k = now.eof
    if settings.guard:
        verdict = guard(history, run)
        if verdict is not None and verdict["regressed"]:
            return Decision(verdict["from"], (
                f"undo: the training loss since the move at step {verdict['moved_at']} is "
                f"{verdict['observed']:.4f}, the law before it predicted {verdict['predicted']:.4f} "
                f"(> {GUARD_Z:g} x SE {verdict['se']:.4f}); back to eof {verdict['from']}"),
                {"guard": verdict, "undo": True})
    law = training_law(run, now.step)
    details: dict = {"law": law}
    if "fit" not in law:
        return Decision(k, f"hold: {law['reason']}", details)
    allowed = share_allowed(settings, history, law)
    details["share_allowed"] = None if math.isinf(allowed) else allowed    # None: any share
    top = ceiling(history, run)
    if now.shift is None and now.deviation is None:
        return Decision(k, f"hold: {law['reason']}; the budget allows a share of {allowed:.3f}, "
                           f"no probe read at this check", details)
    shares = settled_shares(history, settings.plasticity)
    if shares is None:
        return Decision(k, f"hold: {law['reason']}; one probe read so far", details)
    depth = k
    while depth < top and shares[depth + 1] <= allowed:
        depth += 1
    details.update(shares=list(shares), depth=depth)
    if depth == k:
        nxt = shares[k + 1] if k < top else math.nan
        return Decision(k, f"hold: {law['reason']}; space {k + 1} moved {nxt:.3f}x the output, "
                           f"the budget allows {allowed:.3f}", details)
    saved = saving(run, now.step, k, depth)
    details["saving"] = saved
    if saved < settings.min_saving:
        return Decision(k, f"hold: freezing to eof {depth} would save {saved:.3f} of the run's "
                           f"FLOPs (< {settings.min_saving:g})", details)
    details["given_up"] = shares[depth] * law["remaining"]
    return Decision(depth, f"move: {law['reason']}; layers {k + 1}..{depth} moved at most "
                           f"{shares[depth]:.3f}x the output (budget allows {allowed:.3f}); "
                           f"saves {saved:.3f} of the run", details)
