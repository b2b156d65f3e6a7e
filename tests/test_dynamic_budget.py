"""salf-budget, the budget-aware controller (salf.dynamic.budget): its decisions on made-up
histories — a short run moves where a long one holds, a saturated run moves early and deep,
the saving floor, the probe on demand, the undo guard — and an undone move on a real tiny
model: the layers train again (gradients, fresh optimizer state in the model's order), the
audit records their frozen interval, and a run resumed on either side of the undo ends
bit-identical to the uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from salf.choices import DYNAMIC_POLICIES, Registry
from salf.config import TrainConfig
from salf.dynamic import Check, DynamicSettings, RunShape, decide
from salf.dynamic.budget import READ_SHARE, ceiling, charged, guard, probe_wanted, share_allowed, training_law
from salf.errors import SalfError

L = 8


def _losses(steps: int, e=0.4, a=1.0, alpha=0.7, flat_after: int | None = None, bump=None):
    """[step, clock, loss] on a clean power law (clock = steps), optionally flat after a step
    or raised by `bump(step)`; a small deterministic wobble stands in for batch noise."""
    out = []
    for s in range(1, steps + 1):
        x = min(s, flat_after) if flat_after else s
        y = e + a * x ** (-alpha) + 0.002 * math.sin(1.7 * s)
        out.append((s, float(s), y + (bump(s) if bump else 0.0)))
    return out


def _run(total: int, losses, max_eof=L - 1) -> RunShape:
    return RunShape(num_layers=L, total_steps=total, total_progress=float(total), max_eof=max_eof,
                    train_losses=losses, cut_cost=[1.0 - (2 / 3) * k / L for k in range(L + 1)])


def _read(step: int, eof: int, shares: list[float]) -> Check:
    """A probe read whose spaces moved `shares` x the output space (space L moved 0.1)."""
    shift = [0.1 * s for s in shares] + [0.1] * (L + 1 - len(shares))
    return Check(step=step, eof=eof, progress=float(step), deviation=[0.0] * (L + 1), loss=1.0, shift=shift)


SETTINGS = DynamicSettings(policy="salf-budget")
SHARES = [0.0, 0.01, 0.02, 0.03, 0.05, 0.3, 0.6, 0.9]      # spaces 0..7: low ones settled


def test_a_short_run_moves_where_a_long_one_holds_on_the_same_evidence():
    history = [_read(0, 0, [0.0] * (L + 1)), _read(40, 0, SHARES)]
    short = decide(SETTINGS, history, _run(48, _losses(40)))
    long = decide(SETTINGS, history, _run(360, _losses(40)))
    assert short.eof > long.eof, (short.reason, long.reason)
    law_short, law_long = short.details["law"], long.details["law"]
    assert law_long["remaining"] > law_short["remaining"]          # more still ahead in a long run
    assert short.details["given_up"] <= SETTINGS.tolerance * law_short["level"]


def test_a_saturated_run_moves_early_and_as_deep_as_the_shares_allow():
    history = [_read(0, 0, [0.0] * (L + 1)), _read(12, 0, SHARES)]
    decision = decide(SETTINGS, history, _run(120, _losses(12, flat_after=3)))
    law = decision.details["law"]
    assert law["remaining"] < SETTINGS.tolerance * law["level"]     # any share fits the budget
    assert decision.eof == L - 1                                    # nothing ahead to give up


def test_the_label_format_transient_is_not_part_of_the_law():
    """Two first steps at 6.1 and 3.0, then ~1 (bbc-news starts so) would make the run look
    saturated; the law starts after it, and the move is the one without it."""
    transient = [(1, 1.0, 6.1), (2, 2.0, 3.0)] + [(s, x, y + 0.5) for s, x, y in _losses(40)[2:]]
    clean = [(s, x, y + 0.5) for s, x, y in _losses(40)[2:]]
    with_it, without = training_law(_run(360, transient), 40), training_law(_run(360, clean), 40)
    assert with_it["remaining"] == pytest.approx(without["remaining"])
    assert with_it["level"] == pytest.approx(without["level"])


def test_no_probe_read_means_no_move_and_the_probe_is_wanted_only_while_the_budget_allows():
    run = _run(48, _losses(40))
    bare = Check(step=40, eof=0, progress=40.0)
    assert decide(SETTINGS, [_read(0, 0, [0.0] * (L + 1)), bare], run).eof == 0
    assert probe_wanted(SETTINGS, [_read(0, 0, [0.0] * (L + 1)), bare], run)
    spent = _read(0, 0, [0.0] * (L + 1))
    spent.given_up = 1.0                                            # the whole budget given up
    assert not probe_wanted(SETTINGS, [spent, bare], run)
    too_early = _run(120, _losses(3))
    assert "ready" not in training_law(too_early, 3)                # too few losses for a law
    assert not probe_wanted(SETTINGS, [_read(0, 0, [0.0] * (L + 1)), Check(3, 0, 3.0)], too_early)


def test_a_move_that_saves_too_little_is_not_made():
    history = [_read(0, 0, [0.0] * (L + 1)), _read(119, 0, SHARES)]
    decision = decide(SETTINGS, history, _run(120, _losses(119)))
    assert decision.eof == 0 and "would save" in decision.reason


def test_a_noisy_flat_stretch_is_not_read_as_saturation():
    """The rate's upper bound keeps R above 0 while the noise could hide an improvement."""
    noisy = [(s, float(s), 0.4 + 0.2 * ((s * 7919) % 13 - 6) / 6) for s in range(1, 41)]
    law = training_law(_run(120, noisy), 40)
    assert law["remaining"] > 0.05 and law["rate_upper"] > 0
    assert law["remaining"] > training_law(_run(48, noisy), 40)["remaining"]   # more clock ahead


def test_the_guard_undoes_a_move_the_loss_did_not_take_and_caps_later_moves():
    bump = lambda s: 0.2 if s > 40 else 0.0                         # noqa: E731 the loss jumps after the move
    run = _run(120, _losses(60, bump=bump))
    moved = [_read(0, 0, [0.0] * (L + 1)), _read(40, 0, SHARES), Check(step=60, eof=3, progress=60.0)]
    verdict = guard(moved, run)
    assert verdict["regressed"] and verdict["moved_at"] == 40 and verdict["from"] == 0
    decision = decide(SETTINGS, moved, run)
    assert decision.eof == 0 and decision.details["undo"]
    calm = _run(120, _losses(60))
    assert not guard(moved, calm)["regressed"]
    assert decide(SETTINGS, moved, calm).eof >= 3                   # no regression, no undo
    off = DynamicSettings(policy="salf-budget", guard=False)
    assert decide(off, moved, run).eof >= 3
    undone = [*moved, Check(step=70, eof=0, progress=70.0)]
    assert ceiling(undone, run) == 0 and not probe_wanted(SETTINGS, undone, run)


def test_one_move_freezes_at_most_max_move_of_the_layers():
    """A saturated run the budget lets freeze to L - 1 at once moves ceil(0.3 x 8) = 3 layers
    with the bound, and goes on from there at the next read."""
    history = [_read(0, 0, [0.0] * (L + 1)), _read(12, 0, SHARES)]
    run = _run(120, _losses(12, flat_after=3))
    bounded = DynamicSettings(policy="salf-budget", max_move=0.3)
    decision = decide(bounded, history, run)
    assert decision.eof == 3 and decision.details["depth"] == L - 1
    assert "one move's bound" in decision.reason
    assert decision.details["share"] == SHARES[3]
    later = [*history, _read(36, 3, SHARES[:4] + [0.0] * 5)]     # frozen spaces stop moving
    assert decide(bounded, later, _run(120, _losses(36, flat_after=3))).eof == 6
    assert decide(SETTINGS, history, run).eof == L - 1              # 0: no bound


def test_hindsight_accounting_frees_what_a_move_no_longer_puts_at_stake():
    """A move made while R was large (the early noise) spent the whole budget for good under
    "fixed"; re-read in hindsight, once the run has flattened, it is charged its share of the
    little improvement made since plus the little still ahead, so a later move is allowed."""
    run = _run(120, _losses(100, flat_after=30))
    law = training_law(run, 100)
    move = _read(20, 0, SHARES)
    move.given_up, move.share = SETTINGS.tolerance * law["level"], 0.05   # the whole budget
    history = [_read(0, 0, [0.0] * (L + 1)), move, Check(step=100, eof=3, progress=100.0)]
    fixed = DynamicSettings(policy="salf-budget")
    hindsight = DynamicSettings(policy="salf-budget", accounting="hindsight")
    assert share_allowed(fixed, history, run, law) == 0.0
    made = training_law(run, 20)["level"] - law["level"]
    assert charged(hindsight, history, run, law) == pytest.approx(0.05 * (made + law["remaining"]))
    assert share_allowed(hindsight, history, run, law) > READ_SHARE
    undone = [*history, Check(step=110, eof=0, progress=110.0)]   # an undone move keeps its charge
    assert charged(hindsight, undone, run, law) == move.given_up


def test_only_an_undo_may_move_the_cut_back():
    from salf.dynamic.policies import Decision

    reg = _registry({"back": lambda settings, history, run: Decision(0, "back")})
    with reg, pytest.raises(SalfError, match="move the cut back"):
        decide(DynamicSettings(policy="back"), [Check(step=4, eof=2, progress=4.0)], _run(8, []))


def test_budget_settings_are_checked_by_name():
    for bad in (dict(tolerance=-0.1), dict(min_saving=2.0), dict(probe_budget=float("nan")),
                dict(law_checks=0), dict(guard="yes"), dict(max_move=1.5),
                dict(accounting="later")):
        with pytest.raises(SalfError, match="dynamic"):
            DynamicSettings(policy="salf-budget", **bad)


def test_settings_added_later_stay_out_of_the_record_at_the_published_value():
    """A run recorded before max_move/accounting existed (its run.json, a sweep cell, a
    checkpoint) records the same settings as one made now at their defaults, so it resumes;
    set, they are recorded."""
    recorded = DynamicSettings(policy="salf-budget").to_dict()
    assert "max_move" not in recorded and "accounting" not in recorded
    assert DynamicSettings.from_dict(recorded) == DynamicSettings(policy="salf-budget")
    changed = DynamicSettings(policy="salf-budget", max_move=0.2, accounting="hindsight").to_dict()
    assert changed["max_move"] == 0.2 and changed["accounting"] == "hindsight"


def test_a_run_of_the_first_controller_written_before_budget_settings_existed_resumes(tmp_path):
    """Its run.json lacks salf-budget's settings; read today they take their defaults, so the
    resume goes on — and a setting that really differs is still refused, by name."""
    import json

    from salf.dynamic.callback import DynamicFreezeCallback
    from salf.train.loop import check_resume

    callback = DynamicFreezeCallback(DynamicSettings(policy="linear"))
    now = {"lr": 0.01, "callbacks": {"dynamic": callback.run_settings()}}
    old_settings = {k: v for k, v in callback.run_settings()["settings"].items()
                    if k not in ("tolerance", "min_saving", "probe_budget", "law_checks", "guard")}
    old = {"lr": 0.01, "callbacks": {"dynamic": dict(callback.run_settings(), settings=old_settings)}}
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(SalfError, match="tolerance"):
        check_resume(tmp_path / "run.json", now, ("lr", "callbacks"))        # read as written
    check_resume(tmp_path / "run.json", now, ("lr", "callbacks"), [callback])
    old["callbacks"]["dynamic"]["settings"]["checks"] = 20
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(SalfError, match=r"settings\.checks 20 \(now 10\)"):
        check_resume(tmp_path / "run.json", now, ("lr", "callbacks"), [callback])


# ----------------------------------------------------------------------------- an undone move


class _registry:
    """Swap in a registry holding the built-in policies plus `extra` {name: function}."""

    def __init__(self, extra: dict):
        self.extra = extra

    def __enter__(self):
        import salf.dynamic.policies as policies
        import salf.dynamic.settings as settings

        reg = Registry("dynamic policy")
        for choice in DYNAMIC_POLICIES:
            reg.register(choice.name, choice.help, impl=choice.impl, needs=choice.needs)
        for name, fn in self.extra.items():
            globals()[f"_policy_{name}"] = fn
            reg.register(name, name, impl=f"{__name__}:_policy_{name}")
        self.saved = policies.DYNAMIC_POLICIES, settings.DYNAMIC_POLICIES
        policies.DYNAMIC_POLICIES = settings.DYNAMIC_POLICIES = reg
        return reg

    def __exit__(self, *exc):
        import salf.dynamic.policies as policies
        import salf.dynamic.settings as settings

        policies.DYNAMIC_POLICIES, settings.DYNAMIC_POLICIES = self.saved


def _move_then_undo(settings, history, run):
    """eof 2 at step 2, back to 1 at step 4 (an undo), then hold."""
    from salf.dynamic.policies import Decision

    now = history[-1]
    if now.step == 2:
        return Decision(2, "move")
    if now.step == 4:
        return Decision(1, "undo", {"undo": True})
    return Decision(now.eof, "hold")


class _Record(TrainerCallback):
    """After the undo (the 5th step): which parameters train, have gradients, sit in the
    optimizer (and in which order), and the optimizer's state at the end."""

    def __init__(self):
        self.seen: dict = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 4:
            names = {id(p): n for n, p in model.named_parameters()}
            self.seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
            self.seen["with_grad"] = [n for n, p in model.named_parameters() if p.grad is not None]
            self.seen["groups"] = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        self.seen["state"] = sorted(names[id(p)] for p in optimizer.state)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def _train(out, resume=False, callbacks=()):
    from salf.dynamic import moving_cut
    from salf.models.tiny import tiny_model, tiny_tokenizer
    from salf.train import train
    from test_dynamic import TASK, _rows, make_plan

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tiny_model("llama"), tiny_tokenizer(), TASK, (_rows(24), []), make_plan(0), out,
                     TrainConfig(max_steps=8, lr=1e-2, batch_size=4, max_length=32, save_steps=2, resume=resume,
                                 seed=0, progress=False),
                     callbacks=[*callbacks, moving_cut(
                         DynamicSettings(policy="scripted", checks=8), out_dir=out)])
    finally:
        torch.set_num_threads(threads)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "model.safetensors"))


def test_an_undone_move_trains_its_layers_again_and_resumes_bit_identical(tmp_path):
    with _registry({"scripted": _move_then_undo}):
        record = _Record()
        whole = _train(tmp_path / "whole", callbacks=[record])
        runs = {}
        for stop in (3, 4):          # between the move and the undo; right after the undo
            out = tmp_path / f"stop{stop}"
            _train(out, callbacks=[_StopAt(stop)])
            runs[stop] = _train(out, resume=True)
    dyn = whole["dynamic"]
    assert dyn["schedule"] == [[0, 0], [2, 2], [4, 1]]
    seen = record.seen
    layer1 = [n for n in seen["trainable"] if ".layers.1." in n]
    assert layer1 and not any(".layers.0." in n for n in seen["trainable"])
    assert seen["with_grad"] == seen["trainable"]                    # layer 2 learns again
    order = {n: i for i, n in enumerate(seen["trainable"])}
    flat = [n for g in seen["groups"] for n in g]
    assert sorted(flat) == sorted(seen["trainable"])                 # every trainable one, once
    assert all(g == sorted(g, key=order.get) for g in seen["groups"])   # in the model's order
    assert set(layer1) <= set(seen["state"])                         # fresh state after rejoining
    audit = dyn["audit"]
    assert audit["ok"] and set(audit["undone_intervals"]) == set(layer1)
    assert all(v == [[2, 4]] for v in audit["undone_intervals"].values())
    reference = _weights(tmp_path / "whole")
    for stop, resumed in runs.items():
        assert resumed["resumed_from_step"] == (2 if stop == 3 else 4)
        assert resumed["dynamic"]["schedule"] == dyn["schedule"]
        assert [p["loss"] for p in resumed["train"]["loss_curve"]] == \
            [p["loss"] for p in whole["train"]["loss_curve"]]
        got = _weights(tmp_path / f"stop{stop}")
        assert all(torch.equal(reference[k], got[k]) for k in reference), stop


def test_the_prefix_cache_follows_an_undone_move(tmp_path):
    """--cache-prefix with a move and its undo: the cache is rebuilt at the cut it went back
    to, and training is the one without the cache (over 2 epochs the cache replays)."""
    from salf.dynamic import moving_cut
    from salf.models.tiny import tiny_model, tiny_tokenizer
    from salf.train import train
    from test_dynamic import TASK, _rows, make_plan

    results = {}
    with _registry({"scripted": _move_then_undo}):
        for cached in (False, True):
            model = tiny_model("llama")
            metrics = train(model, tiny_tokenizer(), TASK, (_rows(24), []), make_plan(1), tmp_path / str(cached),
                            TrainConfig(epochs=2, batch_size=4, max_length=32, seed=0, progress=False,
                                        cache_prefix=cached),
                            callbacks=[moving_cut(DynamicSettings(policy="scripted"))])
            results[cached] = ([p["loss"] for p in metrics["train"]["loss_curve"]],
                               {n: p.detach().clone() for n, p in model.named_parameters()}, metrics)
    schedule = results[True][2]["dynamic"]["schedule"]
    assert schedule == results[False][2]["dynamic"]["schedule"] == [[0, 1], [2, 2], [4, 1]]
    assert results[True][2]["prefix_cache"]["eof"] == 1 and results[True][2]["prefix_cache"]["examples"] > 0
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    for name, p in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], p, atol=1e-5, rtol=1e-4)


def test_probe_reads_are_spread_over_the_run():
    """A read right after another is not wanted: READ_GAP of the run must pass (the step-0
    baseline does not count)."""
    run = _run(120, _losses(80))
    base = _read(0, 0, [0.0] * (L + 1))
    assert probe_wanted(SETTINGS, [base, Check(step=30, eof=0, progress=30.0)], run)
    read = _read(48, 0, SHARES)
    assert not probe_wanted(SETTINGS, [base, read, Check(step=51, eof=0, progress=51.0)], run)
    assert probe_wanted(SETTINGS, [base, read, Check(step=72, eof=0, progress=72.0)], run)


def test_the_cli_offers_every_dynamic_setting_from_its_metadata():
    """`salf train` has one flag per DynamicSettings field, with the field's help text: the
    settings, the CLI and checks.dynamic_settings_of read one table (issue #23)."""
    import argparse
    import dataclasses

    from salf.checks import dynamic_settings_of
    from salf.cli import build_parser
    from salf.dynamic.settings import FLAGS

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items()
                 if a[0] == "train")[1]
    offered = {o: a for a in train._actions for o in a.option_strings}
    for f in dataclasses.fields(DynamicSettings):
        action = offered[FLAGS[f.name]]
        assert action.help.startswith(f.metadata["help"]), f.name
        assert action.default is None, f.name                      # a flag given is a flag seen
    args = train.parse_args(["--model", "m", "--dataset", "d", "--full", "--out", "o",
                             "--dynamic", "salf-budget", "--max-move", "0.2",
                             "--budget-accounting", "hindsight", "--no-undo-guard"])
    assert dynamic_settings_of(args) == DynamicSettings(policy="salf-budget", max_move=0.2,
                                                        accounting="hindsight", guard=False)
    assert isinstance(offered["--undo-guard"], argparse.BooleanOptionalAction)


def test_a_sweep_cell_recorded_before_later_settings_still_counts(tmp_path):
    """The first controller's published cells were recorded before salf-budget's settings
    existed: `salf sweep --selectors dyn-salf` still counts them (those settings do not touch
    its policy), while a cell that ran another threshold is refused."""
    import json

    from salf.sweep.cells import check_dynamic_cell

    def cell(settings: dict, cut: int = 4):
        path = tmp_path / "cell.json"
        path.write_text(json.dumps({"cut": cut, "dynamic": {"settings": settings}}))
        return path

    asked = {"cut": 4, "selector": "dyn-salf", "dynamic": DynamicSettings().to_dict()}
    old = {k: v for k, v in DynamicSettings().to_dict().items()
           if k not in ("tolerance", "min_saving", "probe_budget", "law_checks", "guard")}
    check_dynamic_cell(cell(old), asked)                               # counts
    with pytest.raises(SalfError, match="other dynamic settings"):
        check_dynamic_cell(cell(dict(old, tau=0.3)), asked)
    with pytest.raises(SalfError, match="other dynamic settings"):
        check_dynamic_cell(cell(old, cut=2), asked)
    budget = {"cut": 4, "selector": "dyn-salf-budget",
              "dynamic": DynamicSettings(policy="salf-budget").to_dict()}
    check_dynamic_cell(cell(DynamicSettings(policy="salf-budget").to_dict()), budget)
    with pytest.raises(SalfError, match="other dynamic settings"):
        check_dynamic_cell(cell(DynamicSettings(policy="salf-budget", tolerance=0.1).to_dict()), budget)
