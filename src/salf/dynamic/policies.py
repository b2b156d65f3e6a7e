"""When and how deep to move the cut: pure decision functions over the history of checks.

A dynamic run checks at steps t_1 < t_2 < ... (docs/method.md, "Dynamic freezing"). Each
check is a `Check`: the step, the cut in force, the training progress, and what the policy
asked to measure (the probe's deviation per space and task loss; per-layer gradient norms).
A policy maps the history to a `Decision` — the cut to hold from now on, never shallower
than the current one — and says why. Nothing here touches a model, so every rule is
testable on made-up histories; `salf.dynamic.callback` measures and moves.

Policies (all share the deepest allowed cut `max_eof`):
  salf-budget what freezing would give up of the improvement ahead vs the FLOPs it saves,
              with an undo guard (salf.dynamic.budget)
  salf        semantic plasticity + the step scaling law (both must agree; the first controller)
  autofreeze  per-layer gradient-norm change rate under the median (Liu et al. 2021)
  linear      from `start` of the budget, freeze linearly up to max_eof (Composer)
  freezeout   layer i frozen at T·(t0 + (1-t0)·i/(L-1))³ (Brock et al. 2017)
  static      never moves (the static pick, with the checks logged)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from ..analysis.gains import fit_power_law
from ..choices import DYNAMIC_POLICIES
from ..errors import SalfError
from ..plan import layer_span
from .settings import DynamicSettings

@dataclass
class Check:
    """One check: where the run was and what was measured (None = not measured)."""

    step: int
    eof: int                             # the cut in force while the interval ran
    progress: float                      # training progress on the settings' clock
    deviation: list[float] | None = None  # D_l on the probe set, l = 0..L
    loss: float | None = None            # the probe's task loss
    grad_norms: list[float] | None = None  # L1 norm of each layer's gradients over the interval
    probe_from_layer: int | None = None  # the probe read ran decoder layers from here up
    shift: list[float] | None = None     # per space: mean |Δ cos(t_l, b_y)| since the last read
    given_up: float | None = None        # salf-budget: the loss the move decided here gives up
    share: float | None = None           # salf-budget: the share ρ of the layers that move froze
    # salf-budget reading shares from the updates: per decoder layer, then one entry for every
    # other trainable tensor, the first-order loss decrease its updates made over the interval
    allocation: list[float] | None = None
    allocation_steps: int | None = None  # the optimizer steps that allocation sums

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Decision:
    eof: int                             # the cut from now on (>= the current one)
    reason: str
    details: dict = field(default_factory=dict)


@dataclass
class RunShape:
    """What a policy knows about the run besides the checks."""

    num_layers: int
    total_steps: int
    total_progress: float                # the clock's value at the last step
    max_eof: int
    # salf-budget: [step, clock after it, training loss] of every logged step so far, and
    # each cut's per-step cost relative to full fine-tuning (index = eof)
    train_losses: list[tuple[int, float, float]] = field(default_factory=list)
    cut_cost: list[float] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)   # the clock's increment per step

    def progress_share(self, check: Check) -> float:
        return check.step / self.total_steps if self.total_steps else 1.0

    def clock(self, step: int) -> float:
        """The clock's value after `step` steps (steps without multipliers count 1)."""
        return sum(self.multipliers[:step]) if self.multipliers else float(step)


def decide(settings: DynamicSettings, history: list[Check], run: RunShape) -> Decision:
    """The cut to hold after the last check of `history` (never shallower than it)."""
    if not history:
        raise SalfError("a dynamic decision needs at least one check")
    rule = DYNAMIC_POLICIES.get(settings.policy)[0].function
    decision = rule(settings, history, run)
    current = history[-1].eof
    undo = decision.details.get("undo", False)
    if decision.eof < current and not undo:      # only a guard's undo moves the cut back
        raise SalfError(f"dynamic policy {settings.policy} asked to move the cut back "
                        f"({current} -> {decision.eof})")
    if undo and decision.eof > current:
        raise SalfError(f"dynamic policy {settings.policy}: an undo must move the cut back "
                        f"({current} -> {decision.eof})")
    if not undo:
        decision.eof = min(decision.eof, max(run.max_eof, current))
    return decision


# --------------------------------------------------------------------------- salf


def step_law(history: list[Check], run: RunShape, settings: DynamicSettings) -> dict:
    """Signal (b): fit ℓ(x) = E + A·x^(-β) to the probe losses after step 0 and compare the
    predicted remaining improvement ℓ̂(x_now) - ℓ̂(x_T) with the improvement so far, read
    on the law too, ℓ̂(x_1) - ℓ̂(x_now) (the fit smooths the probe's noise; a law that no
    longer decreases — A = 0 — says the run has saturated). Returns the fit, both numbers,
    their ratio and `past_knee`."""
    points = [(c.progress, c.loss) for c in history if c.step > 0 and c.loss is not None]
    out: dict = {"points": len(points), "past_knee": False}
    if len(points) < settings.min_points:
        out["reason"] = f"{len(points)} probe checks after step 0, the law needs {settings.min_points}"
        return out
    xs, ys = zip(*points)
    if min(xs) <= 0:
        out["reason"] = "no training progress recorded yet"
        return out
    fit = fit_power_law(xs, ys)
    law = lambda x: fit["E"] + fit["A"] * x ** (-fit["alpha"])  # noqa: E731
    remaining = max(0.0, law(xs[-1]) - law(run.total_progress))
    so_far = law(xs[0]) - law(xs[-1])
    flat = so_far <= 1e-12
    ratio = 0.0 if flat else remaining / so_far
    out.update(fit={k: fit[k] for k in ("E", "A", "alpha", "r2")}, remaining=remaining,
               so_far=so_far, ratio=ratio, past_knee=ratio <= settings.epsilon)
    first = next(c.step for c in history if c.step > 0)
    out["reason"] = (f"the probe loss law is flat since step {first} (saturated)" if flat else
                     f"predicted remaining improvement {remaining:.4f} is {ratio:.2f}x the "
                     f"{so_far:.4f} so far (R² {fit['r2']:.2f}; past the knee at <= "
                     f"{settings.epsilon:g})")
    return out


def settled_depth(history: list[Check], tau: float, max_eof: int, measure: str = "shift") -> dict:
    """Signal (a): the deepest k' such that every space l in (eof, k'] moved at most tau x as
    much as the output space over the last interval (`measure`: "shift", each probe target's
    own move, or "deviation", the move of their mean D_l). Spaces at or below the cut are
    frozen and do not move at all."""
    k = history[-1].eof
    shares = settled_shares(history, measure)
    if shares is None:
        return {"eof": k, "reason": "one probe check so far: no interval to compare"}
    out_moved = shares.moved_output
    depth = k
    while depth < max_eof and shares[depth + 1] <= tau:
        depth += 1
    stopper = depth + 1 if depth < max_eof else None
    why = (f"space {stopper} moved {shares[stopper]:.2f}x the output's {out_moved:.4f}"
           if stopper is not None else f"every space up to the deepest cut {max_eof} settled")
    return {"eof": depth, "shares": shares, "output_moved": out_moved, "reason": why}


class Shares(list):
    """Per space l = 0..L: how far it moved over the last probe interval relative to the
    output space (`moved_output`: the output's own move)."""

    moved_output: float = 0.0


def settled_shares(history: list[Check], measure: str = "shift") -> Shares | None:
    """Each space's move over the interval between the last two probe reads, relative to
    the output space's (None without two reads ending at the last check)."""
    now, before = history[-1], _previous_probe(history)
    if before is None or now.deviation is None or (measure == "shift" and now.shift is None):
        return None
    moved = (list(now.shift) if measure == "shift" else
             [abs(a - b) for a, b in zip(now.deviation, before.deviation)])
    out_moved = moved[-1]
    shares = Shares(m / out_moved if out_moved > 0 else (0.0 if m == 0 else math.inf) for m in moved)
    shares.moved_output = out_moved
    return shares


def _previous_probe(history: list[Check]) -> Check | None:
    probes = [c for c in history[:-1] if c.deviation is not None]
    return probes[-1] if probes else None


def decide_salf(settings, history, run) -> Decision:
    k = history[-1].eof
    law = step_law(history, run, settings)
    depth = settled_depth(history, settings.tau, run.max_eof, settings.plasticity)
    details = {"step_law": law, "plasticity": depth}
    if not law["past_knee"]:
        return Decision(k, f"hold: {law['reason']}", details)
    if depth["eof"] <= k:
        return Decision(k, f"hold: past the knee, but {depth['reason']}", details)
    return Decision(depth["eof"], f"move: {law['reason']}; {depth['reason']}", details)


# --------------------------------------------------------------------------- baselines


def decide_static(settings, history, run) -> Decision:
    return Decision(history[-1].eof, "static: the cut never moves")


def decide_linear(settings, history, run) -> Decision:
    """Composer's LayerFreezing: nothing moves before `start` (default 0.5) of the run; then
    the cut grows linearly to max_eof at the last step."""
    start = 0.5 if settings.start is None else settings.start
    now, share = history[-1], run.progress_share(history[-1])
    k0 = history[0].eof
    if share <= start:
        return Decision(now.eof, f"linear: {share:.0%} of the run, freezing starts at {start:.0%}")
    target = k0 + math.floor((share - start) / (1 - start) * (run.max_eof - k0))
    return Decision(max(now.eof, target), f"linear: {share:.0%} of the run -> eof {target}")


def decide_freezeout(settings, history, run) -> Decision:
    """FreezeOut's cubic schedule: decoder layer i (1-based) leaves training at
    T·(t0 + (1 - t0)·(i-1)/(L-1))³ (t0 = 0.8 by default: the first at 51% of the run)."""
    t0 = 0.8 if settings.start is None else settings.start
    L, share = run.num_layers, run.progress_share(history[-1])
    frozen = 0
    for i in range(1, run.max_eof + 1):
        frac = (t0 + (1 - t0) * (i - 1) / max(L - 1, 1)) ** 3
        if share >= frac:
            frozen = i
    return Decision(max(history[-1].eof, frozen), f"freezeout: {share:.0%} of the run -> eof {frozen}")


def decide_autofreeze(settings, history, run) -> Decision:
    """AutoFreeze: rate r_l = |G_prev - G_now| / G_prev of each trainable layer's gradient
    norm over the last two intervals; the new cut is below the first layer at or above the
    rate percentile of the trainable layers."""
    now = history[-1]
    prev = next((c for c in reversed(history[:-1]) if c.grad_norms is not None), None)
    if prev is None or now.grad_norms is None:
        return Decision(now.eof, "autofreeze: needs gradient norms over two intervals")
    k = now.eof
    active = range(k, run.num_layers)
    rates = {i: abs(prev.grad_norms[i] - now.grad_norms[i]) / prev.grad_norms[i]
             for i in active if prev.grad_norms[i] > 0}
    if not rates:
        return Decision(k, "autofreeze: no gradient on the trainable layers")
    threshold = _percentile(list(rates.values()), settings.percentile)
    depth = k
    while depth < run.max_eof and rates.get(depth, math.inf) < threshold:
        depth += 1
    return Decision(depth, f"autofreeze: rate threshold {threshold:.3f} (p{settings.percentile:g}); "
                           f"{layer_span(k + 1, depth)} under it", {"rates": rates, "threshold": threshold})


def _percentile(values: list[float], q: float) -> float:
    if q == 50.0:
        return statistics.median(values)
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
