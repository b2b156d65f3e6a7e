"""Gains, scaling-law benefit estimates and cut policies (docs/method.md, formula map §5, §7).

Every function takes a `Trace`, a trace dict (`Trace.to_dict()` / JSON) or a
plain sequence of deviations D_0..D_L, and returns plain floats/ints/dicts
(JSON-ready, never NaN: flat, plateau-then-transition and non-monotone traces
all give finite results; where an estimator cannot be trusted the result says
so and, for the benefit curve, falls back to the prior *visibly*).

Constants (named so the docs and reports can cite them):
- R2_MIN          depth-law fits with R² below this are rejected (ok=False).
- ALPHA_BOUNDS    bounds of the depth-law exponent α.
- ALPHA_PRIOR     prior exponent for the trainable-parameter term, an
                  assumption standing in for Zhang et al. (ICLR 2024): must be
                  calibrated (docs/method.md, "Prior").
- TIE_TOLERANCE   `max-gain`/`budget` treat benefits within this fraction of
                  the best as ties and take the cheapest (deepest) cut.
- ONSET_FRACTION  transition onset = the space after the last one (before the
                  minimum) still within this fraction of the drop from the plateau.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..choices import CUT_POLICIES
from ..defaults import DEFAULT_POLICY  # noqa: F401  (re-exported)
from ..errors import SalfError

R2_MIN = 0.5
ALPHA_BOUNDS = (0.01, 5.0)
ALPHA_PRIOR = 0.1
TIE_TOLERANCE = 0.01
ONSET_FRACTION = 0.10
MIN_FIT_POINTS = 4            # a 3-parameter law needs more than 3 spaces to say anything
_GRID_POINTS = 241
_FLAT_EPS = 1e-9

VALID_POLICIES = tuple(CUT_POLICIES.labels())
BENEFIT_SOURCES = ("depth", "prior", "given")
_RULES_NEEDING_COST = {c.kind for c in CUT_POLICIES if "cost" in c.needs}


# --------------------------------------------------------------------------- input


def deviations(trace) -> np.ndarray:
    """D_0..D_L as a float64 array from a Trace, a trace dict or a sequence of numbers."""
    if hasattr(trace, "spaces"):
        vals = [s.get("deviation") for s in trace.spaces]
    elif isinstance(trace, Mapping):
        if "spaces" not in trace:
            raise SalfError("not a salf trace: no 'spaces'")
        vals = [s.get("deviation") for s in trace["spaces"]]
    elif isinstance(trace, Sequence) or isinstance(trace, np.ndarray):
        vals = list(trace)
    else:
        raise SalfError(f"expected a Trace, trace dict or list of deviations, got {type(trace).__name__}")
    if len(vals) < 2:
        raise SalfError("a trace needs at least 2 latent spaces (1 decoder layer)")
    if any(v is None for v in vals):
        raise SalfError("trace has spaces without a deviation")
    D = np.asarray(vals, dtype=np.float64)
    if not np.all(np.isfinite(D)):
        bad = [i for i, v in enumerate(D) if not math.isfinite(v)]
        raise SalfError(f"trace deviations are not finite at spaces {bad}")
    return D


def inference_gains(trace) -> list[float]:
    """Δ_l = D_{l-1} - D_l for decoder layers l = 1..L (list index l-1)."""
    D = deviations(trace)
    return [float(x) for x in D[:-1] - D[1:]]


# --------------------------------------------------------------------------- depth law


def _fit_fixed_alpha(x: np.ndarray, D: np.ndarray, alpha: float, e_max: float):
    """Least squares of D ≈ E + A·x^(-α) with E in [0, e_max], A >= 0: (sse, E, A). Exact."""
    f = x ** (-alpha)
    cands = []
    # interior
    Fm = np.stack([np.ones_like(f), f], axis=1)
    sol, *_ = np.linalg.lstsq(Fm, D, rcond=None)
    E, A = float(sol[0]), float(sol[1])
    if 0.0 <= E <= e_max and A >= 0.0:
        cands.append((E, A))
    ff = float(f @ f)
    for E_b in (0.0, e_max):                       # faces E = bound, A >= 0
        A_b = max(0.0, float(f @ (D - E_b)) / ff) if ff > 0 else 0.0
        cands.append((E_b, A_b))
    cands.append((min(max(float(D.mean()), 0.0), e_max), 0.0))   # face A = 0
    best = None
    for E_c, A_c in cands:
        r = D - (E_c + A_c * f)
        sse = float(r @ r)
        if best is None or sse < best[0]:
            best = (sse, E_c, A_c)
    return best


def fit_power_law(x, y, bounds: tuple[float, float] = ALPHA_BOUNDS) -> dict:
    """Least-squares fit of y ≈ E + A·x^(-α): α in `bounds` (log grid + golden-section
    refinement), E in [0, max y], A >= 0. Returns {alpha, E, A, r2, sse}; r2 is 0.0 for
    constant y. Shared by the depth law (x = space + 1) and the step law of dynamic freezing
    (x = training progress)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    e_max = float(max(y.max(), 0.0))
    sst = float(((y - y.mean()) ** 2).sum())
    lo, hi = bounds
    grid = np.geomspace(lo, hi, _GRID_POINTS)
    sses = [_fit_fixed_alpha(x, y, a, e_max)[0] for a in grid]
    i = int(np.argmin(sses))
    # golden-section refinement on log α between the grid neighbours
    a_lo, a_hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    g = (math.sqrt(5) - 1) / 2
    c, d = a_hi - g * (a_hi - a_lo), a_lo + g * (a_hi - a_lo)

    def sse_at(la):
        return _fit_fixed_alpha(x, y, math.exp(la), e_max)[0]

    fc, fd = sse_at(c), sse_at(d)
    for _ in range(40):
        if fc < fd:
            a_hi, d, fd = d, c, fc
            c = a_hi - g * (a_hi - a_lo)
            fc = sse_at(c)
        else:
            a_lo, c, fc = c, d, fd
            d = a_lo + g * (a_hi - a_lo)
            fd = sse_at(d)
    cand = [(sses[i], float(grid[i])), (fc, math.exp(c)), (fd, math.exp(d))]
    _, alpha = min(cand)
    sse, E, A = _fit_fixed_alpha(x, y, alpha, e_max)
    r2 = float(1.0 - sse / sst) if sst > 0 else 0.0
    return {"alpha": float(alpha), "E": float(E), "A": float(A), "r2": r2, "sse": float(sse)}


def fit_depth_law(trace) -> dict:
    """Fit D(l) ≈ E + A·(l+1)^(-α) over spaces l = 0..L (`fit_power_law`).

    Returns {alpha, E, A, r2, ok, reason}; ok=False when the trace is flat, too short, or
    R² < R2_MIN. All numbers are finite; r2 is 0.0 where it is undefined (flat trace).
    """
    D = deviations(trace)
    sst = float(((D - D.mean()) ** 2).sum())
    if sst <= _FLAT_EPS * max(1.0, float(np.abs(D).max())) ** 2:
        return {"alpha": ALPHA_BOUNDS[0], "E": float(D.mean()), "A": 0.0, "r2": 0.0, "ok": False,
                "reason": "flat trace: the deviation does not vary over depth, α is not identifiable",
                "n_points": len(D)}
    fit = fit_power_law(np.arange(len(D), dtype=np.float64) + 1.0, D)
    r2, A = fit["r2"], fit["A"]
    out = {k: fit[k] for k in ("alpha", "E", "A", "r2")} | {"n_points": len(D)}
    if len(D) < MIN_FIT_POINTS:
        out.update(ok=False, reason=f"only {len(D)} latent spaces: too few for a 3-parameter law "
                                    f"(need {MIN_FIT_POINTS})")
    elif r2 < R2_MIN:
        shape = " (the trace does not decrease with depth)" if A == 0.0 else ""
        out.update(ok=False, reason=f"depth power law fits badly: R² {r2:.2f} < {R2_MIN}{shape}")
    else:
        out.update(ok=True, reason=f"depth power law fits: R² {r2:.2f}")
    return out


def prior_law(trace, alpha: float = ALPHA_PRIOR) -> dict:
    """The prior: α = ALPHA_PRIOR (an assumption, see docs/method.md), E = min_l D_l."""
    D = deviations(trace)
    return {"alpha": float(alpha), "E": float(D.min()), "A": None, "r2": None, "ok": True,
            "reason": f"prior exponent α={alpha:g} (assumed, uncalibrated; Zhang et al. 2024 form), "
                      "floor E = min over spaces of D"}


# --------------------------------------------------------------------------- benefit


def benefit_curve(trace, source: str = "depth", *, alpha: float | None = None,
                  floor: float | None = None) -> dict:
    """Predicted deviation and benefit of fine-tuning the suffix above each cut k = 0..L-1.

    D̂(k) = E + (D_k - E)·(n+1)^(-α) with n = L - k trainable layers, B(k) = max(0, D_L - D̂(k)).
    source: "depth" (α, E from `fit_depth_law`; falls back to the prior, visibly, when the
    fit is not ok), "prior" (`prior_law`), or "given" (caller's `alpha`, `floor`; floor
    defaults to min D — e.g. from a calibration run). `alpha`/`floor` also override the
    chosen source's values when passed with "depth"/"prior" (recorded in `overrides`).
    """
    if source not in BENEFIT_SOURCES:
        raise SalfError(f"unknown benefit source {source!r}; choose from {', '.join(BENEFIT_SOURCES)}")
    D = deviations(trace)
    L = len(D) - 1
    fallback = fallback_reason = None
    if source == "depth":
        fit = fit_depth_law(D)
        if fit["ok"]:
            a, E, used = fit["alpha"], fit["E"], "depth"
        else:
            pr = prior_law(D)
            a, E, used = pr["alpha"], pr["E"], "prior"
            fallback, fallback_reason = "prior", fit["reason"]
    elif source == "prior":
        fit = prior_law(D)
        a, E, used = fit["alpha"], fit["E"], "prior"
    else:
        if alpha is None:
            raise SalfError("benefit source 'given' needs alpha (and optionally floor)")
        fit = {"alpha": float(alpha), "E": float(D.min() if floor is None else floor), "A": None,
               "r2": None, "ok": True, "reason": "α and E given by the caller"}
        a, E, used = fit["alpha"], fit["E"], "given"
    overrides = {}
    if alpha is not None:
        overrides["alpha"] = a = float(alpha)
    if floor is not None:
        overrides["E"] = E = float(floor)
    if not (math.isfinite(a) and math.isfinite(E)) or a < 0:
        raise SalfError(f"benefit curve needs finite α >= 0 and E, got α={a}, E={E}")
    cuts = list(range(L))
    n = L - np.arange(L, dtype=np.float64)
    predicted = E + (D[:L] - E) * (n + 1.0) ** (-a)
    benefit = np.maximum(0.0, D[L] - predicted)
    return {"source": used, "requested": source, "fallback": fallback,
            "fallback_reason": fallback_reason, "alpha": float(a), "E": float(E),
            "overrides": overrides or None, "fit": fit, "cuts": cuts,
            "predicted": [float(v) for v in predicted], "benefit": [float(v) for v in benefit]}


# --------------------------------------------------------------------------- onset


def transition_onset(trace, fraction: float = ONSET_FRACTION) -> int:
    """Space l where the semantic transition starts; 0 if the trace never descends.

    The transition is the descent to the trace's minimum D_m (first argmin).
    Its plateau level is P = max(D_0..D_m) and its size P - D_m. The onset is
    the space right after the *last* l <= m still within `fraction` of the
    drop from the plateau (D_l >= P - fraction·(P - D_m)): the descent that
    follows is never undone before the minimum. Looking backwards from the
    minimum makes early wobbles on the plateau (a dip that recovers) harmless.
    Returns l in 1..L (decoder layer l is the first one of the final descent),
    or 0 for traces with no drop at all (flat, or rising from space 0).
    """
    D = deviations(trace)
    m = int(np.argmin(D))
    P = float(D[:m + 1].max())
    total = P - float(D[m])
    if m == 0 or total <= _FLAT_EPS * max(1.0, float(np.abs(D).max())):
        return 0
    near_plateau = np.flatnonzero(D[:m + 1] >= P - fraction * total)
    return int(near_plateau[-1]) + 1


# --------------------------------------------------------------------------- policies


def parse_policy(policy: str) -> tuple[str, dict]:
    """(the choose_cut rule, its settings) of a policy as typed (salf.choices.CUT_POLICIES)."""
    if not isinstance(policy, str):
        raise SalfError(f"policy must be a string; valid: {', '.join(VALID_POLICIES)}")
    p = policy.strip().lower().replace("_", "-")
    if p.startswith("budget") and p[len("budget"):].lstrip()[:1] == ":":
        p = "budget=" + p[len("budget"):].lstrip()[1:]      # budget:0.5 reads as budget=0.5
    found = CUT_POLICIES.find(p.replace(" ", ""))
    if found is None:
        if p.startswith("budget"):
            raise _bad_budget(policy)
        raise SalfError(f"unknown policy {policy!r}; valid policies: {', '.join(VALID_POLICIES)}")
    choice, value = found
    params = dict(choice.options)
    if choice.param:   # budget=B: B > 0, a fraction of full fine-tuning's cost
        try:
            b = float(value)
        except ValueError:
            b = float("nan")
        if not (math.isfinite(b) and b > 0):
            raise _bad_budget(policy)
        params["budget"] = b
    return choice.kind, params


def _bad_budget(policy: str) -> SalfError:
    return SalfError(f"invalid budget policy {policy!r}: use budget=B with B > 0, a fraction of "
                     "full fine-tuning cost (e.g. budget=0.5)")


def _check_cost(cost, L: int, needed_by: str | None) -> np.ndarray | None:
    if cost is None:
        if needed_by:
            raise SalfError(f"policy {needed_by} needs the predicted cost of every cut (cost=...)")
        return None
    c = np.asarray([float(v) for v in cost], dtype=np.float64)
    if len(c) not in (L, L + 1):
        raise SalfError(f"cost must have one entry per cut k=0..{L - 1} (or 0..{L}); got {len(c)}")
    c = c[:L]
    if not np.all(np.isfinite(c)):
        raise SalfError("cost contains NaN/inf")
    return c


def _best_with_ties(idx: np.ndarray, benefit: np.ndarray, cost: np.ndarray | None) -> tuple[int, bool]:
    """Among candidate cuts `idx`, the cheapest within TIE_TOLERANCE of the best benefit."""
    b = benefit[idx]
    best = float(b.max())
    ties = idx[b >= best - TIE_TOLERANCE * abs(best)]
    if cost is not None:
        k = int(ties[np.lexsort((-ties, cost[ties]))[0]])   # cheapest, then deepest
    else:
        k = int(ties.max())                                 # deepest = cheapest
    return k, len(ties) > 1


def _knee(cost: np.ndarray, benefit: np.ndarray) -> tuple[int, str]:
    """Kneedle-style knee of benefit vs cost on the Pareto frontier."""
    order = sorted(range(len(cost)), key=lambda k: (cost[k], -benefit[k], -k))
    frontier = []
    for k in order:
        if not frontier or benefit[k] > benefit[frontier[-1]]:
            if frontier and cost[k] == cost[frontier[-1]]:
                continue
            frontier.append(k)
    if len(frontier) == 1:
        return frontier[0], "single Pareto-optimal cut (benefit does not grow with cost)"
    c = np.array([cost[k] for k in frontier])
    b = np.array([benefit[k] for k in frontier])
    x = (c - c[0]) / (c[-1] - c[0])
    y = (b - b[0]) / (b[-1] - b[0])
    diff = y - x                      # height above the chord (normalised axes)
    j = int(np.argmax(diff))
    if diff[j] <= 1e-12:
        return frontier[-1], "no knee (benefit grows at most linearly with cost): max-benefit cut"
    return frontier[j], f"knee of the benefit-cost frontier ({len(frontier)} Pareto cuts)"


def choose_cut(trace, policy: str, cost: Sequence[float] | None = None, *,
               benefit_source: str = "depth", alpha: float | None = None,
               floor: float | None = None) -> dict:
    """Pick the end-of-freezing cut k in [0, L-1] (embeddings + layers 1..k frozen).

    policy: "paper" (argmax Δ_l), "max-gain" (argmax benefit, ties → cheapest),
    "budget=B" (best benefit with cost[k] <= B; needs cost), "knee" (cost-benefit
    knee; needs cost), "onset" (the layer before the transition onset).
    cost: predicted training cost of each cut relative to full fine-tuning, for
    k = 0..L-1 (a list for k = 0..L is accepted; entry L is ignored).
    Returns {eof, policy, params, reason, benefit, predicted, cost, curve}.
    """
    name, params = parse_policy(policy)
    D = deviations(trace)
    L = len(D) - 1
    c = _check_cost(cost, L, needed_by=name if name in _RULES_NEEDING_COST else None)
    if floor is None and "floor" in params:
        floor = params["floor"]
    curve = benefit_curve(D, benefit_source, alpha=alpha, floor=floor)
    B = np.asarray(curve["benefit"])
    params = dict(params, benefit_source=curve["source"])
    if curve["fallback"]:
        params["fallback"] = curve["fallback"]
    eof, reason = _CUT_RULES[name](D, B, c, params)
    if curve["fallback"]:
        reason += f" [benefit from the prior: {curve['fallback_reason']}]"
    return {"eof": int(eof), "policy": _policy_label(name, params),
            "params": params, "reason": reason, "benefit": float(B[eof]),
            "predicted": float(curve["predicted"][eof]),
            "cost": float(c[eof]) if c is not None else None, "curve": curve}


# Each rule of choose_cut: (deviations D_0..D_L, benefit B(k), cost c(k) or None, the policy's
# params, to which it adds what it used) -> (eof, reason).


def _cut_paper(D: np.ndarray, B: np.ndarray, c, params: dict) -> tuple[int, str]:
    """The layer of largest inference gain Δ_l (clipped to L-1: one layer left to train)."""
    L = len(D) - 1
    gains = np.asarray(inference_gains(D))
    layer = int(np.argmax(gains)) + 1                      # decoder layer 1..L
    eof = min(layer, L - 1)
    reason = f"layer {layer} has the largest inference gain Δ={gains[layer - 1]:.4g}"
    if layer == L:
        reason += f"; it is the last layer, so eof is clipped to {L - 1} (one layer left to train)"
    if gains.max() <= 0:
        reason += " (no layer reduces the deviation: the trace never descends)"
    params["argmax_layer"] = layer
    return eof, reason


def _cut_max_gain(D: np.ndarray, B: np.ndarray, c, params: dict) -> tuple[int, str]:
    """The largest predicted benefit; among ties, the cheapest cut."""
    eof, tied = _best_with_ties(np.arange(len(D) - 1), B, c)
    if B.max() <= 0:
        reason = "no cut predicts a benefit; taking the cheapest (deepest) cut"
    else:
        reason = f"max predicted benefit {B.max():.4g}"
        if tied:
            reason += f"; cheapest of the cuts within {TIE_TOLERANCE:.0%} of it"
    params["tolerance"] = TIE_TOLERANCE
    return eof, reason


def _cut_budget(D: np.ndarray, B: np.ndarray, c, params: dict) -> tuple[int, str]:
    """The largest predicted benefit among the cuts costing at most the budget."""
    budget = params["budget"]
    ok = np.flatnonzero(c <= budget)
    if len(ok) == 0:
        raise SalfError(f"no cut fits budget {budget:g}: the cheapest cut costs "
                        f"{c.min():.3g} x full fine-tuning")
    eof, tied = _best_with_ties(ok, B, c)
    reason = (f"best predicted benefit {B[eof]:.4g} among {len(ok)} cuts with cost <= {budget:g} "
              "x full fine-tuning")
    params["tolerance"] = TIE_TOLERANCE
    return eof, reason


def _cut_knee(D: np.ndarray, B: np.ndarray, c, params: dict) -> tuple[int, str]:
    return _knee(c, B)


def _cut_onset(D: np.ndarray, B: np.ndarray, c, params: dict) -> tuple[int, str]:
    """The layer before the transition onset (nothing frozen without a transition)."""
    L = len(D) - 1
    onset = transition_onset(D)
    eof = int(min(max(onset - 1, 0), L - 1))
    if onset == 0:
        reason = "no semantic transition (the trace never descends): nothing frozen"
    else:
        reason = (f"transition starts at space {onset} (the trace leaves the plateau for good, "
                  f"{ONSET_FRACTION:.0%} rule); freezing up to layer {eof}")
    params.update(onset=onset, fraction=ONSET_FRACTION)
    return eof, reason


_CUT_RULES = {"paper": _cut_paper, "max-gain": _cut_max_gain, "budget": _cut_budget,
              "knee": _cut_knee, "onset": _cut_onset}


def _policy_label(name: str, params: dict) -> str:
    """The policy as a plan records it: budget=B, name-variant or the rule's name."""
    label = f"budget={params['budget']:g}" if name == "budget" else name
    if params.get("variant"):
        label = f"{name}-{params['variant']}"
    return label
