"""`salf-budget`: the second-generation controller — freeze what the rest of the run can spare.

The first controller (`salf`, kept as it was) moves once the probe's loss law is past its knee
and the low spaces have settled, with thresholds set on 120-step runs. This one asks, at every
check, what freezing layers (k, k'] would cost the rest of *this* run and what it would save:

* **What is still ahead, from the training loss** that every step computes anyway (after
  the first steps' label-format drop): the loss level now, the rate it improved at between
  the middle and the last third of the steps (per unit of the settings' clock, lr-area by
  default), and R = (that rate + one standard error) × the clock left — an upper bound on
  the improvement the rest of the run can still make: small when the run is short, late or
  saturated, large early in a long one. (A power law fitted to the per-step losses was the
  first formulation; on the published runs its R jumped between 0 and 0.05 from one check
  to the next — the per-batch loss is as noisy as the run's whole improvement.)
* **The loss budget.** Over the whole run the moves may give up at most `tolerance` × the
  loss level. Freezing layers (k, k′] gives up ≈ ρ(k′)·R, where ρ(k′) is how far space k′
  moved relative to the output space over the last probe interval (their share of the
  recent semantic movement, the probe's signal (a)) — or, with `share_from="updates"`, the
  share of the recent training steps' first-order loss decrease their updates made
  (salf.dynamic.allocation: free, no probe). With `ahead_from="updates"` as well, a move's
  cost is what its layers' updates would still lower the loss over the clock left, at
  their recent rate + 1 SE — absolute, with no R from the training loss; `ahead_from="drift"`
  reads that rate from the fresh gradient along each layer's displacement over the last tenth
  of the run instead (allocation.Drift: the drift, not the step's oscillation). The deepest
  contiguous k′ whose cost fits what is left of the budget is the candidate. Long runs (large
  R) therefore freeze later or shallower, saturated runs (R ≈ 0) early and deep.
* **The saving floor.** A move must save at least `min_saving` of the run's full fine-tuning
  FLOPs over the steps that remain (the cost model's per-step cost at each cut), or it is not
  worth its risk.
* **Probes on demand.** The probe (the only evidence that costs a forward pass) is read only
  when the budget could allow a move (`probe_wanted`), and never beyond `probe_budget` of the
  run's FLOPs (the callback enforces that).
* **The undo guard.** After a move the next checks compare the training loss since the move
  with as many steps before it; a rise beyond GUARD_Z standard errors moves the cut back to
  where it was (the layers rejoin training with fresh optimizer state), and the run never
  freezes past that cut again.

Pure functions over the history, like every policy (salf.dynamic.policies); docs/method.md,
"The budget-aware controller", gives the rule and why.
"""

from __future__ import annotations

import math
import statistics

from .policies import Check, Decision, RunShape, settled_shares

GUARD_Z = 3.0            # standard errors of the loss's rise after a move before the guard acts
RATE_Z = 1.0             # standard errors added to the improvement rate (R is an upper bound)
GUARD_MIN_STEPS = 8      # losses since the move the guard needs before it judges
READ_SHARE = 0.05        # the least share ρ the budget must allow before a probe read is worth it
READ_GAP = 0.2           # the least share of the run between two probe reads after step 0
MIN_LAW_SHARE = 0.05     # the law is fitted once this share of the run (and >= 8 steps) has losses
TRANSIENT = 2.0          # leading losses above this x the median so far: the label format, not the law


def law_points(run: RunShape, upto: int | None = None) -> list[tuple[float, float]]:
    """(clock, loss) of each logged step's training loss so far (up to step `upto`), from
    the first step whose loss is within TRANSIENT x the median of them all: a classification
    run's first steps learn the label format (rotten-tomatoes: 6.14, 1.44, then 0.3-0.8;
    bbc-news: 6.75 ... 0.79 over six steps), a drop the law is not about and which would
    otherwise make everything after it look saturated."""
    points = [(x, y) for s, x, y in run.train_losses if upto is None or s <= upto]
    if not points:
        return points
    median = statistics.median(y for _, y in points)
    start = next((i for i, (_, y) in enumerate(points) if y <= TRANSIENT * median), len(points))
    return points[start:]


def training_law(run: RunShape, step: int) -> dict:
    """What the training losses logged so far say at `step`:
    the loss level now (the mean of the last third of the points), the improvement rate
    per unit of clock between the middle and the last third (the first third, with the
    run's fastest early drop, is left out), its upper bound (+ RATE_Z
    standard errors of the two means' difference), and R, the improvement still ahead if
    the run kept improving at that upper rate over the clock left — an over-estimate, since
    the rate only falls, so a noisy flat stretch never reads as saturation. {"reason"} alone
    while there are too few losses."""
    points = law_points(run, upto=step)
    needed = max(8, math.ceil(MIN_LAW_SHARE * run.total_steps))
    if len(points) < needed:
        return {"reason": f"{len(points)} training losses, the law needs {needed}"}
    third = max(4, len(points) // 3)
    older, recent = points[-2 * third:-third], points[-third:]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    y_old, y_new = mean([y for _, y in older]), mean([y for _, y in recent])
    dx = mean([x for x, _ in recent]) - mean([x for x, _ in older])
    se = math.sqrt(statistics.variance([y for _, y in older]) / len(older)
                   + statistics.variance([y for _, y in recent]) / len(recent))
    # the noise term stays when the loss rose between the thirds: a rise within the noise
    # is no evidence of saturation
    rate, upper = (y_old - y_new) / dx, (max(0.0, y_old - y_new) + RATE_Z * se) / dx
    remaining = max(0.0, upper) * max(0.0, run.total_progress - run.clock(step))
    return {"ready": True, "level": y_new, "rate": rate, "rate_upper": upper, "se": se,
            "remaining": remaining,
            "reason": (f"training loss {y_new:.4f}, improving {rate:.4f} per unit of clock "
                       f"(<= {upper:.4f}): at most {remaining:.4f} still ahead")}


def charged(settings, history: list[Check], run: RunShape, law: dict) -> float:
    """What the moves so far are charged against the budget. "fixed": each move's given_up,
    ρ·R when it was made — R an upper bound that, early in a run, is mostly the loss's noise,
    so a run's first move spent most of the budget for good (bbc-news at 120 steps allowed a
    share of 0.000-0.012 after its move at step 54). "hindsight": a move still in force is
    re-read at every check as ρ × (the improvement the run made since it + R now): the noise
    part of the old bound gives way to what happened; an undone move keeps its first charge."""
    total = 0.0
    for i, c in enumerate(history):
        if c.given_up is None:
            continue
        undone = any(later.eof <= c.eof for later in history[i + 1:])
        if settings.accounting == "fixed" or c.share is None or undone:
            total += c.given_up
            continue
        then = training_law(run, c.step)
        made = max(0.0, then["level"] - law["level"]) if "ready" in then else 0.0
        total += c.share * (made + law["remaining"])
    return total


def budget_left(settings, history: list[Check], run: RunShape, law: dict) -> float:
    """The loss the moves may still give up: tolerance x the loss level, less what the
    moves so far are charged."""
    return settings.tolerance * law["level"] - charged(settings, history, run, law)


def share_allowed(settings, history: list[Check], run: RunShape, law: dict) -> float:
    """The largest ρ a move may freeze now: the budget left over the improvement ahead."""
    left = budget_left(settings, history, run, law)
    if left <= 0:
        return 0.0
    return math.inf if law["remaining"] <= 1e-12 else left / law["remaining"]


def ceiling(history: list[Check], run: RunShape) -> int:
    """The deepest cut still allowed: after an undo, never past the cut it went back to."""
    undone = [c.eof for prev, c in zip(history, history[1:]) if c.eof < prev.eof]
    return min([run.max_eof, *undone])


def probe_wanted(settings, history: list[Check], run: RunShape) -> bool:
    """Whether this check should read the probe: the law is ready, the budget allows a share
    of at least READ_SHARE, the cut can still go deeper, and READ_GAP of the run has passed
    since the last read (two reads a few steps apart measure a move too small to read and
    spend the probe budget: rotten-tomatoes at badba6a read at steps 48 and 51, then had
    none left for the allowance of 0.2-1.5 after step 100)."""
    now = history[-1]
    if now.eof >= ceiling(history, run):
        return False
    last = max((c.step for c in history[:-1] if c.deviation is not None), default=None)
    if last is not None and last > 0 and now.step - last < READ_GAP * run.total_steps:
        return False
    law = training_law(run, now.step)
    return "ready" in law and share_allowed(settings, history, run, law) >= READ_SHARE


def move_bound(settings, run: RunShape) -> int:
    """The most layers one move may freeze: `max_move` of the model's layers, rounded up (no
    bound at 0). The probe's share ρ, read over one interval, does not say what freezing
    the layers costs over a long rest of the run: rotten-tomatoes at 360 steps, seed 2, froze
    4 -> 15 at step 63 with every share under its allowance and ended 0.015 below full
    fine-tuning, while seed 1's moves of 14, 3 and 8 layers from step 117 on cost 0.007."""
    if settings.max_move <= 0:
        return run.max_eof
    return max(1, math.ceil(settings.max_move * run.num_layers - 1e-9))


def saving(run: RunShape, step: int, k: int, deeper: int) -> float:
    """FLOPs saved over the steps left by training at cut `deeper` instead of `k`, as a
    fraction of the run's full fine-tuning FLOPs."""
    left = (run.total_steps - step) / run.total_steps
    return (run.cut_cost[k] - run.cut_cost[deeper]) * left


def guard(history: list[Check], run: RunShape) -> dict | None:
    """Since the last move (if any, and not an undo): the mean training loss of the steps
    after it against the mean of as many steps just before it. Training only lowers the
    loss, so a rise beyond GUARD_Z standard errors of the difference says the layers the
    move froze were still needed. Returns the comparison when the guard can judge."""
    moves = [(prev, c) for prev, c in zip(history, history[1:]) if c.eof != prev.eof]
    if not moves:
        return None
    before, after = moves[-1]
    if after.eof < before.eof:
        return None                                    # the last change was an undo
    moved_at = before.step
    since = [y for s, _, y in run.train_losses if s > moved_at]
    prior = [y for s, _, y in run.train_losses if s <= moved_at][-len(since):] if since else []
    if len(since) < GUARD_MIN_STEPS or len(prior) < GUARD_MIN_STEPS:
        return None
    observed, baseline = sum(since) / len(since), sum(prior) / len(prior)
    se = math.sqrt(statistics.variance(since) / len(since) + statistics.variance(prior) / len(prior))
    return {"moved_at": moved_at, "from": before.eof, "to": after.eof, "observed": observed,
            "before": baseline, "se": se, "steps": len(since),
            "regressed": observed - baseline > GUARD_Z * se}


def decide_salf_budget(settings, history: list[Check], run: RunShape) -> Decision:
    now = history[-1]
    k = now.eof
    if settings.guard:
        verdict = guard(history, run)
        if verdict is not None and verdict["regressed"]:
            return Decision(verdict["from"], (
                f"undo: the training loss over the {verdict['steps']} steps since the move at step "
                f"{verdict['moved_at']} is {verdict['observed']:.4f}, {verdict['before']:.4f} over as "
                f"many before it (> {GUARD_Z:g} x SE {verdict['se']:.4f}); back to eof {verdict['from']}"),
                {"guard": verdict, "undo": True})
    law = training_law(run, now.step)
    details: dict = {"law": law}
    if "ready" not in law:
        return Decision(k, f"hold: {law['reason']}", details)
    allowed = share_allowed(settings, history, run, law)
    details["share_allowed"] = None if math.isinf(allowed) else allowed    # None: any share
    if settings.ahead_from in ("updates", "drift"):
        # the drift's bound needs its standard error measured: two checks at least (the
        # updates' variant, published with one, keeps it)
        drift = settings.ahead_from == "drift"
        ahead = allocation_ahead(history, run, min_checks=2 if drift else 1)
        if ahead is None:
            what = (f"drift readings since the cut last moved cover under {GUARD_MIN_STEPS} steps "
                    "or two checks" if drift else
                    f"updates since the cut last moved cover under {GUARD_MIN_STEPS} steps")
            return Decision(k, f"hold: {law['reason']}; the {what}", details)
        return _move_within(settings, history, run, law, ahead, details, absolute=True)
    if settings.share_from == "updates":
        shares = allocation_shares(history, run)
        if shares is None:
            return Decision(k, f"hold: {law['reason']}; the updates since the cut last moved cover "
                               f"under {GUARD_MIN_STEPS} steps or lowered no layer's loss", details)
        return _move_within(settings, history, run, law, shares, details)
    if now.shift is None and now.deviation is None:
        return Decision(k, f"hold: {law['reason']}; the budget allows a share of {allowed:.3f}, "
                           f"no probe read at this check", details)
    shares = settled_shares(history, settings.plasticity)
    if shares is None:
        return Decision(k, f"hold: {law['reason']}; one probe read so far", details)
    return _move_within(settings, history, run, law, shares, details)


def allocation_window(history: list[Check], run: RunShape) -> list[Check] | None:
    """The checks whose allocation (`--share-from updates`) speaks for the cut in force: those
    since the cut last changed and within READ_GAP of the run (or GUARD_MIN_STEPS, if
    longer); None while they cover fewer than GUARD_MIN_STEPS optimizer steps."""
    now = history[-1]
    # a check's eof is the cut its interval ran at: a move decided at check i shows at i+1
    changed = max((prev.step for prev, c in zip(history, history[1:]) if c.eof != prev.eof), default=0)
    since = max(changed, now.step - max(READ_GAP * run.total_steps, GUARD_MIN_STEPS))
    # each check sums the steps since the one before it, so these began after the change
    window = [c for c in history if c.allocation is not None and c.step > since]
    if sum(c.allocation_steps or 0 for c in window) < GUARD_MIN_STEPS:
        return None
    return window


def allocation_shares(history: list[Check], run: RunShape) -> list[float] | None:
    """`--share-from updates`: per space k' (0..L), the share of the loss decrease the updates
    made over the window (allocation_window) that came through layers (k, k'] — what freezing
    them gives up — cumulative, so it only grows with k'. A layer whose updates raised the
    loss counts 0. None without a window, or when the layers above the cut made no decrease
    (or the optimizer's tensors are not the model's: salf.dynamic.allocation)."""
    window = allocation_window(history, run)
    if window is None:
        return None
    k = history[-1].eof
    width = len(window[0].allocation)
    total = [max(0.0, sum(c.allocation[i] for c in window)) for i in range(width)]
    L = width - 1
    above = total[k:L]
    if sum(above) <= 0:
        return None
    whole = sum(above) + total[L]
    shares, running = [0.0] * (L + 1), 0.0
    for space in range(k + 1, L + 1):
        running += total[space - 1]
        shares[space] = running / whole
    return shares


class Ahead(list):
    """Per space k' (0..L): the loss layers (k, k'] would still lower over the rest of the run
    at their recent rate + RATE_Z SE (what a move is judged by); `expected`: at the rate
    itself (what a move is charged)."""

    expected: list[float]


def allocation_ahead(history: list[Check], run: RunShape, min_checks: int = 1) -> Ahead | None:
    """`--ahead-from updates`: per space k' (0..L), the loss decrease layers (k, k'] would
    still make over the rest of the run — their summed allocation per unit of the clock over
    the window, + RATE_Z standard errors across its checks, at least 0, times the clock left;
    `.expected` without the noise term. Absolute, in the training loss's units: a long run's
    layers still have much to give, a run whose updates no longer lower the loss of rows
    they have not fitted has nothing left in them. A move is judged by the upper bound and
    charged the expectation: at 46b3d38 it was charged the bound, and on bbc-news two
    one-layer moves (0.014 and 0.005, mostly the noise term early in the run) spent the
    whole budget by step 36 while the layers' summed decrease was below zero. None without
    a window, or with fewer than `min_checks` checks in it (one check's standard error is
    not measured: the stand-in |rate| makes the bound 0 for any negative reading)."""
    window = allocation_window(history, run)
    if window is None or len(window) < min_checks:
        return None
    now, k = history[-1], history[-1].eof
    L = len(window[0].allocation) - 1
    clocks = [run.clock(c.step) - run.clock(c.step - (c.allocation_steps or 0)) for c in window]
    spent = sum(clocks)
    if spent <= 0:
        return None
    left = max(0.0, run.total_progress - run.clock(now.step))
    ahead, ahead.expected = Ahead([0.0] * (L + 1)), [0.0] * (L + 1)
    for space in range(k + 1, L + 1):
        block = [sum(c.allocation[k:space]) for c in window]
        rates = [b / x for b, x in zip(block, clocks) if x > 0]
        se = statistics.stdev(rates) / math.sqrt(len(rates)) if len(rates) > 1 else abs(sum(block) / spent)
        ahead[space] = max(0.0, sum(block) / spent + RATE_Z * se) * left
        ahead.expected[space] = max(0.0, sum(block) / spent) * left
    return ahead


def _move_within(settings, history: list[Check], run: RunShape, law: dict, shares, details: dict,
                 absolute: bool = False) -> Decision:
    """The deepest move whose shares fit the allowance (or, `absolute`, whose loss still ahead
    fits the budget left), bounded, worth its saving."""
    now, k = history[-1], history[-1].eof
    allowed = (budget_left(settings, history, run, law) if absolute
               else share_allowed(settings, history, run, law))
    top = ceiling(history, run)
    depth = k
    while depth < top and shares[depth + 1] <= allowed:
        depth += 1
    details.update(shares=list(shares), depth=depth)
    bound = move_bound(settings, run)
    if depth - k > bound:
        depth = k + bound
        details["bounded"] = depth
    if k >= top:
        return Decision(k, f"hold: {law['reason']}; the cut is as deep as it may go (eof {top})", details)
    if depth == k:
        nxt = shares[k + 1]
        read = (f"layer {k + 1} would still lower the loss by {nxt:.4f}, the budget has {allowed:.4f} left"
                if absolute else
                f"layer {k + 1}'s updates made {nxt:.3f} of the loss decrease, the budget allows {allowed:.3f}"
                if settings.share_from == "updates" else
                f"space {k + 1} moved {nxt:.3f}x the output, the budget allows {allowed:.3f}")
        return Decision(k, f"hold: {law['reason']}; {read}", details)
    saved = saving(run, now.step, k, depth)
    details["saving"] = saved
    if saved < settings.min_saving:
        return Decision(k, f"hold: freezing to eof {depth} would save {saved:.3f} of the run's "
                           f"FLOPs (< {settings.min_saving:g})", details)
    if absolute:
        details.update(given_up=shares.expected[depth], bound=shares[depth])
    else:
        details.update(share=shares[depth], given_up=shares[depth] * law["remaining"])
    capped = (f" (one move's bound; the budget allowed eof {details['depth']})"
              if "bounded" in details else "")
    read = (f"would still lower the loss by {shares.expected[depth]:.4f}, at most {shares[depth]:.4f} "
            f"(budget left {allowed:.4f})" if absolute
            else f"made {shares[depth]:.3f} of the loss decrease (budget allows {allowed:.3f})"
            if settings.share_from == "updates"
            else f"moved at most {shares[depth]:.3f}x the output (budget allows {allowed:.3f})")
    return Decision(depth, f"move: {law['reason']}; layers {k + 1}..{depth}{capped} {read}; "
                           f"saves {saved:.3f} of the run", details)
