"""Dynamic-freezing policies on made-up histories: when and how deep each rule moves the cut."""

from __future__ import annotations

import math

import pytest

from salf.dynamic import Check, DynamicSettings, RunShape, cut_per_step, decide
from salf.dynamic.policies import settled_depth, step_law
from salf.errors import SalfError

L, T = 8, 100
RUN = RunShape(num_layers=L, total_steps=T, total_progress=float(T), max_eof=L - 1)


def law(x, E=0.3, A=1.0, beta=1.0):
    return E + A * x ** (-beta)


def checks(steps, eof=1, loss=law, moving=None):
    """A probe history: deviations where space l moved `moving[l]` per interval."""
    moving = moving or [0.0] * (L + 1)
    out = []
    for i, t in enumerate(steps):
        dev = [1.0 - i * m for m in moving]
        out.append(Check(step=t, eof=eof, progress=float(t), deviation=dev,
                         loss=loss(max(t, 1)) if t else 5.0))
    return out


def test_the_law_says_past_the_knee_once_little_improvement_remains():
    s = DynamicSettings(epsilon=0.2)
    early = step_law(checks([0, 5, 10, 15]), RUN, s)
    late = step_law(checks([0, 10, 20, 30, 40, 50, 60]), RUN, s)
    assert early["fit"]["r2"] > 0.99 and late["fit"]["r2"] > 0.99
    assert early["fit"]["alpha"] == pytest.approx(1.0, rel=0.05)
    # at t=15 the law predicts 1/15 - 1/100 more vs 1/5 - 1/15 achieved: 0.43 > 0.2
    assert not early["past_knee"] and early["ratio"] == pytest.approx((1 / 15 - 0.01) / (1 / 5 - 1 / 15), rel=0.05)
    assert late["past_knee"] and late["ratio"] <= 0.2
    assert not step_law(checks([0, 10, 20]), RUN, s)["past_knee"]          # 2 points: no fit
    flat = step_law(checks([0, 10, 20, 30], loss=lambda x: 0.5), RUN, s)
    assert flat["past_knee"] and "saturated" in flat["reason"]           # nothing left to gain
    rising = step_law(checks([0, 10, 20, 30], loss=lambda x: 0.5 + x / 100), RUN, s)
    assert rising["past_knee"] and rising["fit"]["A"] == 0.0


def test_plasticity_freezes_the_spaces_that_stopped_moving_relative_to_the_output():
    moving = [0.0, 0.001, 0.002, 0.004, 0.02, 0.05, 0.08, 0.09, 0.1]   # spaces 0..8
    hist = checks([0, 10], eof=1, moving=moving)
    dev = "deviation"
    assert settled_depth(hist, tau=0.1, max_eof=7, measure=dev)["eof"] == 3   # spaces 2, 3 <= 0.01
    assert settled_depth(hist, tau=0.55, max_eof=7, measure=dev)["eof"] == 5
    assert settled_depth(hist, tau=0.55, max_eof=4, measure=dev)["eof"] == 4  # capped
    still = settled_depth(hist, tau=0.001, max_eof=7, measure=dev)
    assert still["eof"] == 1 and "space 2 moved" in still["reason"]
    # "shift": each target's own move, recorded by the callback on the check
    hist[-1].shift = [0.0, 0.0, 0.001, 0.002, 0.05, 0.06, 0.08, 0.09, 0.1]
    assert settled_depth(hist, tau=0.1, max_eof=7)["eof"] == 3
    hist[-1].shift = None
    assert "no interval" in settled_depth(hist, tau=0.1, max_eof=7)["reason"]


def test_salf_moves_only_when_both_signals_agree():
    moving = [0.0] * 5 + [0.05, 0.08, 0.09, 0.1]
    s = DynamicSettings(tau=0.1, epsilon=0.2, plasticity="deviation")
    young = checks([0, 5, 10, 15], moving=moving)
    assert decide(s, young, RUN).eof == 1                               # not past the knee
    old = checks([0, 10, 20, 30, 40, 50, 60], moving=moving)
    d = decide(s, old, RUN)
    assert d.eof == 4 and d.reason.startswith("move")
    busy = checks([0, 10, 20, 30, 40, 50, 60], moving=[0.0] + [0.1] * 8)
    assert decide(s, busy, RUN).eof == 1                                # past the knee, all moving


def test_a_policy_never_moves_the_cut_back_and_respects_max_eof():
    s = DynamicSettings(policy="linear")
    hist = [Check(step=0, eof=2, progress=0.0), Check(step=90, eof=6, progress=90.0)]
    assert decide(s, hist, RUN).eof == 6                                # linear says 5; hold 6
    capped = RunShape(num_layers=L, total_steps=T, total_progress=float(T), max_eof=3)
    assert decide(s, [Check(step=0, eof=0, progress=0.0), Check(step=T, eof=0, progress=100.0)],
                  capped).eof == 3


def test_linear_and_freezeout_schedules():
    lin = DynamicSettings(policy="linear")
    at = lambda t, k=0: decide(lin, [Check(step=0, eof=0, progress=0.0),  # noqa: E731
                                     Check(step=t, eof=k, progress=float(t))], RUN).eof
    assert [at(t) for t in (10, 50, 60, 75, 99)] == [0, 0, 1, 3, 6]
    fo = DynamicSettings(policy="freezeout")
    first = math.ceil(0.8 ** 3 * T)                                     # layer 1 at 51.2% of the run
    assert decide(fo, [Check(step=first - 1, eof=0, progress=0.0)], RUN).eof == 0
    assert decide(fo, [Check(step=first, eof=0, progress=0.0)], RUN).eof == 1
    assert decide(fo, [Check(step=T, eof=0, progress=0.0)], RUN).eof == L - 1


def test_autofreeze_freezes_the_prefix_whose_gradient_norm_stopped_changing():
    s = DynamicSettings(policy="autofreeze")
    prev = Check(step=10, eof=0, progress=10.0, grad_norms=[10.0] * L)
    now = Check(step=20, eof=0, progress=20.0, grad_norms=[9.9, 9.8, 9.9, 5.0, 9.9, 4.0, 3.0, 2.0])
    d = decide(s, [prev, now], RUN)
    # rates 0.01 0.02 0.01 0.5 0.01 0.6 0.7 0.8: median 0.26; layers 1-3 under it, layer 4 not
    assert d.eof == 3 and d.details["threshold"] == pytest.approx(0.26)
    assert decide(s, [now], RUN).eof == 0                                # one interval only


def test_static_holds_and_settings_are_checked():
    assert decide(DynamicSettings(policy="static"), checks([0, 50]), RUN).eof == 1
    for bad in (dict(policy="nope"), dict(tau=-1), dict(clock="days"), dict(checks=0),
                dict(plasticity="vibes"),
                dict(start=1.5), dict(max_eof=-2)):
        with pytest.raises(SalfError):
            DynamicSettings(**bad)
    s = DynamicSettings(policy="autofreeze", tau=0.3)
    assert DynamicSettings.from_dict(s.to_dict()) == s


def test_cut_per_step_expands_a_schedule():
    assert cut_per_step([[0, 2], [3, 5], [4, 7]], 6) == [2, 2, 2, 5, 7, 7]
    with pytest.raises(SalfError):
        cut_per_step([[1, 2]], 3)
