"""salf-budget reading its shares from the updates (`--share-from updates`): the loss change
allocation per layer (salf.dynamic.allocation) against a hand computation for AdamW and
SGD, the cumulative shares over the window since the cut last moved, decisions on made-up
histories (a long run holds where a short one moves; a layer whose updates still lower the
loss is not frozen), and a run on a tiny model that moves with no probe at all."""

from __future__ import annotations

import math

import pytest
import torch

from salf.config import TrainConfig
from salf.dynamic import Check, DynamicSettings, RunShape, decide
from salf.dynamic.allocation import Drift, allocation
from salf.dynamic.budget import allocation_shares

L = 8
SETTINGS = DynamicSettings(policy="salf-budget", share_from="updates")


def _net():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    head = torch.nn.Linear(4, 2)
    return layers, head


def _backward(layers, head, seed):
    torch.manual_seed(seed)
    x = torch.randn(5, 4)
    for layer in layers:
        x = torch.tanh(layer(x))
    head(x).pow(2).mean().backward()


def test_adamw_allocation_is_lr_times_gradient_along_the_previous_moments():
    layers, head = _net()
    layers[0].requires_grad_(False)                       # a frozen layer counts nothing
    params = [p for p in [*layers.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    _backward(layers, head, 1)
    assert allocation(layers, opt) is None                 # no moments yet: no measurement
    opt.step()
    opt.zero_grad()
    _backward(layers, head, 2)
    got = allocation(layers, opt)

    def expected(ps):
        total = 0.0
        for p in ps:
            st = opt.state[p]
            t = float(st["step"])
            m = st["exp_avg"] / (1 - 0.8 ** t)
            v = st["exp_avg_sq"] / (1 - 0.95 ** t)
            total += 0.01 * float((p.grad * m / (v.sqrt() + 1e-6)).sum())
        return total

    assert got[0] == 0.0
    for i in (1, 2):
        assert got[i] == pytest.approx(expected(list(layers[i].parameters())), rel=1e-5)
    assert got[3] == pytest.approx(expected(list(head.parameters())), rel=1e-5)
    assert got[1] > 0 and got[2] > 0                       # one more step along the same slope helps


def test_an_optimizer_that_holds_none_of_the_layers_tensors_measures_nothing():
    """Copies of the tensors (as ZeRO and FSDP hold) match no layer: None, not zeros that a
    policy would read as 'nothing left to gain'."""
    layers, head = _net()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in layers.parameters()]
    for c in copies:
        c.grad = torch.ones_like(c)
    assert allocation(layers, torch.optim.SGD(copies, lr=0.1)) is None


def test_plain_sgd_allocation_is_lr_times_the_squared_gradient():
    layers, head = _net()
    opt = torch.optim.SGD([*layers.parameters(), *head.parameters()], lr=0.1)
    _backward(layers, head, 3)
    got = allocation(layers, opt)
    want = [0.1 * sum(float((p.grad ** 2).sum()) for p in layer.parameters()) for layer in layers]
    assert got[:3] == pytest.approx(want, rel=1e-6)
    assert got[3] == pytest.approx(0.1 * sum(float((p.grad ** 2).sum()) for p in head.parameters()), rel=1e-6)



def test_drift_is_the_fresh_gradient_along_the_last_periods_displacement():
    """−g·(θ_b − θ_a) per layer, scaled to the step's share of the clock D took; None until
    two snapshots exist (the first at step `period`, not 0: the label format's drift); a layer
    frozen at the snapshots counts nothing; the snapshots roll on every period boundary."""
    layers, head = _net()
    layers[0].requires_grad_(False)
    clock_of = [0.0, 1.0, 1.8, 2.4, 2.8, 3.0, 3.1, 3.15, 3.18]   # a decaying learning rate's area
    clock = clock_of.__getitem__
    drift = Drift(period=2)
    thetas = {}
    for step in range(8):
        for layer in layers:
            layer.zero_grad()
        _backward(layers, head, 10 + step)
        thetas[step] = [[p.detach().clone() for p in layer.parameters()] for layer in layers]
        got = drift.observe(step, layers, clock)
        if step < 4:
            assert got is None and drift.steps == ([] if step < 2 else [2])
        else:
            a, b = (2, 4) if step < 6 else (4, 6)
            assert drift.steps == [a, b]
            scale = (clock(step + 1) - clock(step)) / (clock(b) - clock(a))
            want = [0.0] + [-scale * sum(float((p.grad * (pb - pa)).sum())
                                         for p, pa, pb in zip(layers[i].parameters(), thetas[a][i], thetas[b][i]))
                            for i in (1, 2)]
            assert got[:3] == pytest.approx(want, rel=1e-5, abs=1e-12)
            assert got[3] == 0.0 and got[1] != 0.0
        with torch.no_grad():                               # a consistent drift plus noise
            for layer in layers[1:]:
                for p in layer.parameters():
                    p.add_(0.05 + 0.01 * torch.randn_like(p))


def test_continuing_a_drift_downhill_reads_positive_and_an_oscillation_reads_about_zero():
    """The point of the lag: on a quadratic bowl, a layer drifting towards the minimum reads a
    decrease still ahead; one oscillating across the minimum (its steps cancel over a period)
    reads next to nothing, where the per-step allocation would read its overshoot."""
    target = torch.zeros(4)
    drifting, oscillating = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    layers = torch.nn.ModuleList([drifting, oscillating])
    with torch.no_grad():
        drifting.weight.fill_(1.0)
        oscillating.weight.fill_(0.01)
    drift = Drift(period=4)
    readings = []
    for step in range(16):
        for layer in layers:
            layer.weight.grad = 2 * (layer.weight.detach() - target.view(2, 2))   # ∇ of |w|²
        got = drift.observe(step, layers, float)
        if got is not None:
            readings.append(got)
        with torch.no_grad():
            drifting.weight.mul_(0.95)                    # steadily downhill
            oscillating.weight.mul_(-1.0)                 # across the valley and back
    assert all(r[0] > 0 for r in readings)
    assert all(abs(r[1]) < 1e-3 * r[0] for r in readings)


def _losses(steps, e=0.4, a=1.0, alpha=0.7, flat_after=None):
    out = []
    for s in range(1, steps + 1):
        x = min(s, flat_after) if flat_after else s
        out.append((s, float(s), e + a * x ** (-alpha) + 0.002 * math.sin(1.7 * s)))
    return out


def _run(total, losses):
    return RunShape(num_layers=L, total_steps=total, total_progress=float(total), max_eof=L - 1,
                    train_losses=losses, cut_cost=[1.0 - (2 / 3) * k / L for k in range(L + 1)])


def _checks(steps, eof, per_layer, rest=0.0, every=4):
    """Checks every `every` steps, each allocating `per_layer` (layers 1..L) and `rest`."""
    return [Check(step=s, eof=eof, progress=float(s), allocation=[*per_layer, rest], allocation_steps=every)
            for s in range(every, steps + 1, every)]


# low layers make little of the decrease, the top ones most (sums to 1 with rest 0.1)
LOW_TO_HIGH = [0.002, 0.004, 0.006, 0.008, 0.08, 0.2, 0.25, 0.35]


def test_shares_are_cumulative_over_the_layers_a_move_would_freeze():
    history = _checks(40, 0, LOW_TO_HIGH, rest=0.1)
    shares = allocation_shares(history, _run(100, _losses(40)))
    whole = sum(LOW_TO_HIGH) + 0.1
    assert shares[0] == 0.0
    assert shares[3] == pytest.approx((0.002 + 0.004 + 0.006) / whole)
    assert shares[L] == pytest.approx(sum(LOW_TO_HIGH) / whole)
    assert all(a <= b for a, b in zip(shares, shares[1:]))


def test_a_layer_whose_updates_raised_the_loss_counts_nothing_and_frozen_layers_are_left_out():
    raising = [-0.5, *LOW_TO_HIGH[1:]]
    history = _checks(40, 2, [0.0, 0.0, *raising[2:]], rest=0.1)
    shares = allocation_shares(history, _run(100, _losses(40)))
    assert shares[2] == 0.0                                # layers 1-2 are already frozen
    assert shares[3] == pytest.approx(0.006 / (sum(LOW_TO_HIGH[2:]) + 0.1))
    clipped = _checks(40, 0, raising, rest=0.1)
    assert allocation_shares(clipped, _run(100, _losses(40)))[1] == 0.0


def test_the_window_starts_after_the_last_move_and_needs_enough_steps():
    before = _checks(40, 0, [1.0] * L)                     # every layer busy before the move
    after = [Check(step=44, eof=3, progress=44.0, allocation=[0, 0, 0, *LOW_TO_HIGH[3:], 0.1],
                   allocation_steps=4)]
    run = _run(400, _losses(44))
    assert allocation_shares([*before, *after], run) is None          # 4 steps since the move
    more = after + [Check(step=48, eof=3, progress=48.0, allocation=after[0].allocation, allocation_steps=4)]
    shares = allocation_shares([*before, *more], run)
    assert shares[4] == pytest.approx(0.008 / (sum(LOW_TO_HIGH[3:]) + 0.1))   # the old window is gone
    nothing = [Check(step=s, eof=0, progress=float(s), allocation=[0.0] * (L + 1), allocation_steps=4)
               for s in (4, 8, 12)]
    assert allocation_shares(nothing, run) is None         # no decrease made: no evidence


def test_a_short_run_moves_where_a_long_one_holds_on_the_same_allocation():
    history = _checks(40, 0, LOW_TO_HIGH, rest=0.1)
    short = decide(SETTINGS, history, _run(48, _losses(40)))
    long = decide(SETTINGS, history, _run(360, _losses(40)))
    assert short.eof > long.eof, (short.reason, long.reason)
    assert "of the loss decrease" in short.reason
    assert short.details["given_up"] <= SETTINGS.tolerance * short.details["law"]["level"]


def test_a_saturated_run_freezes_up_to_the_layers_still_learning():
    """R ≈ 0 allows any share, so the move goes as deep as the cut may."""
    history = _checks(12, 0, LOW_TO_HIGH, rest=0.1, every=3)
    decision = decide(SETTINGS, history, _run(120, _losses(12, flat_after=3)))
    assert decision.eof == L - 1


def test_a_budget_that_allows_a_small_share_stops_below_the_busy_layers():
    """Between the extremes the move stops where the cumulative share passes the allowance:
    the layers still making most of the decrease keep training."""
    history = _checks(60, 0, LOW_TO_HIGH, rest=0.1)
    decision = decide(SETTINGS, history, _run(100, _losses(60)))
    allowed = decision.details["share_allowed"]
    shares = decision.details["shares"]
    assert 0 < decision.eof < L - 1, decision.reason
    assert shares[decision.eof] <= allowed < shares[decision.eof + 1]


AHEAD = DynamicSettings(policy="salf-budget", share_from="updates", ahead_from="updates")


def test_what_a_layer_would_still_gain_is_absolute_so_a_long_run_holds_where_a_short_one_moves():
    """Each layer lowers the loss by 0.001 per 4 steps: over 8 steps left that is little, over
    320 it is more than the budget."""
    history = _checks(40, 0, [0.001] * L)
    short = decide(AHEAD, history, _run(48, _losses(40)))
    long = decide(AHEAD, history, _run(360, _losses(40)))
    assert short.eof == L - 1 and long.eof == 0, (short.reason, long.reason)
    assert short.details["shares"][3] == pytest.approx(3 * 0.001 / 4 * 8)   # 3 layers x rate x left
    assert "would still lower the loss" in long.reason


def test_updates_that_no_longer_lower_the_loss_leave_nothing_ahead_early_in_a_long_run():
    """A saturated run: the allocation wobbles around 0, so even 300 steps ahead the layers
    would give up less than the budget — the move comes at the first check that can judge,
    as deep as the noise allows; a noisier wobble allows less."""
    quiet = [Check(step=s, eof=0, progress=float(s), allocation=[1e-6 * (-1) ** (s // 4)] * L + [0.0],
                   allocation_steps=4) for s in range(4, 41, 4)]
    decision = decide(AHEAD, quiet, _run(360, _losses(40, flat_after=3)))
    assert decision.eof == L - 1, decision.reason
    # judged by the bound, charged the expectation (the rate without its noise term: ~0)
    assert decision.details["given_up"] < 0.01 * decision.details["bound"]
    noisy = [Check(step=s, eof=0, progress=float(s), allocation=[1e-3 * (-1) ** (s // 4)] * L + [0.0],
                   allocation_steps=4) for s in range(4, 41, 4)]
    assert 0 <= decide(AHEAD, noisy, _run(360, _losses(40, flat_after=3))).eof < L - 1


def test_ahead_from_updates_needs_the_shares_from_the_updates():
    with pytest.raises(Exception, match="share-from"):
        DynamicSettings(policy="salf-budget", ahead_from="updates")
    assert AHEAD.to_dict()["ahead_from"] == "updates"
    assert "ahead_from" not in SETTINGS.to_dict()


def test_drift_needs_no_probe_and_no_shares_from_the_updates():
    settings = DynamicSettings(policy="salf-budget", ahead_from="drift")
    assert settings.needs.isdisjoint({"probe", "probe_on_demand", "update_shares"})
    assert "drift" in settings.needs and settings.to_dict()["ahead_from"] == "drift"
    assert "drift" not in DynamicSettings(policy="salf").needs



def test_one_negative_drift_reading_is_not_enough_to_move():
    """A window of one check has no measured standard error: the updates' variant (published
    that way) reads a negative block as nothing ahead and moves; the drift's waits for a
    second check, then judges the spread."""
    history = [Check(step=9, eof=0, progress=9.0),
               *[Check(step=s, eof=0, progress=float(s), allocation=[-0.001] * L + [0.0], allocation_steps=9)
                 for s in (18,)]]
    run = _run(360, _losses(18, flat_after=3))
    assert decide(AHEAD, history, run).eof > 0
    drift = DynamicSettings(policy="salf-budget", ahead_from="drift")
    held = decide(drift, history, run)
    assert held.eof == 0 and "two checks" in held.reason
    history.append(Check(step=27, eof=0, progress=27.0, allocation=[0.004] * L + [0.0], allocation_steps=9))
    later = decide(drift, history, _run(360, _losses(27, flat_after=3)))
    assert later.eof == 0 and "would still lower the loss" in later.reason

def test_updates_need_no_probe_and_are_recorded_when_set():
    assert "probe" not in SETTINGS.needs and "update_shares" in SETTINGS.needs
    assert "probe" in DynamicSettings(policy="salf-budget").needs
    assert "share_from" not in DynamicSettings(policy="salf-budget").to_dict()
    assert SETTINGS.to_dict()["share_from"] == "updates"
    with pytest.raises(Exception, match="share-from"):
        DynamicSettings(policy="salf-budget", share_from="gradients")


@pytest.mark.parametrize("ahead_from", ["loss", "updates", "drift"])
def test_a_tiny_run_moves_its_cut_from_the_updates_alone(tmp_path, ahead_from):
    from salf.dynamic import moving_cut
    from salf.models.tiny import tiny_model, tiny_tokenizer
    from salf.train import train
    from test_dynamic import TASK, _rows, make_plan

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = DynamicSettings(policy="salf-budget", ahead_from=ahead_from, law_checks=12,
                                   share_from="probe" if ahead_from == "drift" else "updates",
                                   tolerance=1.0, min_saving=0.0)
        metrics = train(tiny_model("llama"), tiny_tokenizer(), TASK, (_rows(48), []), make_plan(0),
                        tmp_path, TrainConfig(max_steps=24, lr=1e-2, batch_size=4, max_length=32, seed=0,
                                              progress=False),
                        callbacks=[moving_cut(settings, out_dir=tmp_path)])
    finally:
        torch.set_num_threads(threads)
    dyn = metrics["dynamic"]
    assert dyn["probe"]["reads"] == 0
    checks = dyn["checks"]
    if ahead_from == "drift":
        # snapshots every round(0.1 * 24) = 2 steps from step 2: the first displacement is
        # θ4 − θ2, read from the 5th step on
        assert [c["allocation"] for c in checks[:2]] == [None, None]
        checks = checks[2:]
    else:
        assert dyn["settings"]["share_from"] == "updates"
    assert all(c["allocation"] is not None for c in checks)
    # AdamW's first step has no direction yet and is not counted
    first = 2 if ahead_from == "drift" else 1     # drift: steps 4 and 5
    assert [c["allocation_steps"] for c in checks] == [first] + [2] * (len(checks) - 1)
    assert all(len(c["allocation"]) == 5 for c in checks)   # tiny llama: 4 layers + the rest
    assert len(dyn["schedule"]) >= 2, [d["reason"] for d in dyn["decisions"]]   # it moved
    assert dyn["audit"]["ok"]


def test_at_the_deepest_cut_the_policy_says_so():
    history = _checks(40, L - 1, [0.0] * (L - 1) + [0.001], rest=0.0)
    for settings in (SETTINGS, AHEAD):
        decision = decide(settings, history, _run(360, _losses(40, flat_after=3)))
        assert decision.eof == L - 1 and "as deep as it may go (eof 7)" in decision.reason


@pytest.mark.parametrize("ahead_from", ["updates", "drift"])
def test_a_resumed_run_carries_the_allocation_sums(tmp_path, ahead_from):
    """The sums of the interval a checkpoint cuts through are in the controller's state (and
    the drift's snapshots in its tensor state): a run stopped mid-interval and resumed records
    the same allocations as the uninterrupted one."""
    from transformers import TrainerCallback

    from salf.dynamic import moving_cut
    from salf.models.tiny import tiny_model, tiny_tokenizer
    from salf.train import train
    from test_dynamic import TASK, _rows, make_plan

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 7

    def run(out, resume=False, callbacks=()):
        settings = DynamicSettings(policy="salf-budget", ahead_from=ahead_from, law_checks=4,
                                   share_from="updates" if ahead_from == "updates" else "probe",
                                   tolerance=1.0, min_saving=0.0)
        # 20 steps: the drift's snapshots every 2 from step 2, so the resumed run's first reads
        # need θ4 from the checkpoint's tensors
        return train(tiny_model("llama"), tiny_tokenizer(), TASK, (_rows(80), []), make_plan(0), out,
                     TrainConfig(max_steps=20, lr=1e-2, batch_size=4, max_length=32, seed=0, progress=False,
                                 save_steps=2, resume=resume),
                     callbacks=[*callbacks, moving_cut(settings, out_dir=out)])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = run(tmp_path / "whole")
        run(tmp_path / "cut", callbacks=[StopAt()])          # checkpoint at 6, inside the 5..10 interval
        resumed = run(tmp_path / "cut", resume=True)
    finally:
        torch.set_num_threads(threads)
    assert resumed["resumed_from_step"] == 6
    got = [(c["step"], c["allocation"]) for c in resumed["dynamic"]["checks"]]
    want = [(c["step"], c["allocation"]) for c in whole["dynamic"]["checks"]]
    assert [s for s, _ in got] == [s for s, _ in want] == [5, 10, 15]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9)
    assert resumed["dynamic"]["schedule"] == whole["dynamic"]["schedule"]
