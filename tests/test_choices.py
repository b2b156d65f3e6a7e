"""The registries of named choices (salf.choices): each name defined once, and the CLI, the
sweep, the checks and the dispatchers all reading them."""

import argparse

import pytest

from salf.choices import BASELINE_SELECTORS, CUT_POLICIES, DYNAMIC_POLICIES, Registry
from salf.errors import SalfError

FAMILIES = (CUT_POLICIES, BASELINE_SELECTORS, DYNAMIC_POLICIES)


def test_every_function_a_registry_names_exists():
    for family in (BASELINE_SELECTORS, DYNAMIC_POLICIES):
        for choice in family:
            assert callable(choice.function), choice.name


def test_a_name_is_registered_once_and_unknown_names_list_the_choices():
    reg = Registry("thing")
    reg.register("a", "first")
    reg.register("b", "second, with a value", param="N")
    with pytest.raises(ValueError, match="twice"):
        reg.register("a", "again")
    assert reg.find("b=3")[1] == "3" and reg.find("b") is None and "a=1" not in reg
    with pytest.raises(SalfError, match=r"unknown thing 'c'; choose from a, b=N"):
        reg.get("c")


def _choices(verb: str, dest: str):
    from salf.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[verb]._actions if a.dest == dest)


def test_the_cli_reads_its_choices_from_the_registries():
    for verb in ("train", "finetune"):
        assert list(_choices(verb, "dynamic").choices) == DYNAMIC_POLICIES.names()
    for verb in ("analyze", "finetune"):
        assert all(label in _choices(verb, "policy").help for label in CUT_POLICIES.labels())


def test_every_cut_policy_parses_and_picks_a_cut():
    from salf.analysis.gains import choose_cut, parse_policy
    from test_analysis import POWER

    for choice in CUT_POLICIES:
        typed = f"{choice.name}=0.9" if choice.param else choice.name
        rule, params = parse_policy(typed)
        assert rule == choice.kind and {**params, **choice.options} == params
        assert choose_cut(POWER, typed, cost=[1.0 - k / 24 for k in range(12)])["eof"] >= 0


def test_the_sweep_offers_every_sweepable_name_and_only_those():
    from salf.sweep import resolve_selectors

    names = [f"{c.name}=0.5" if c.param else c.name for c in CUT_POLICIES]
    names += BASELINE_SELECTORS.names(sweep=True) + [f"dyn-{n}" for n in DYNAMIC_POLICIES.names()]
    assert resolve_selectors(names, "max-gain-e0") == names
    for hidden in ("full", "lora", "freeze-first-k"):
        with pytest.raises(SalfError, match="unknown selector"):
            resolve_selectors([hidden], "max-gain-e0")


def test_a_dynamic_policy_is_one_registration_plus_its_function(monkeypatch):
    from salf.dynamic import Check, DynamicSettings, RunShape, decide

    reg = Registry("dynamic policy")
    for choice in DYNAMIC_POLICIES:
        reg.register(choice.name, choice.help, impl=choice.impl, needs=choice.needs)
    reg.register("halfway", "jump to the deepest cut at half the run", impl=f"{__name__}:_halfway")
    monkeypatch.setattr("salf.choices.DYNAMIC_POLICIES", reg)
    monkeypatch.setattr("salf.dynamic.settings.DYNAMIC_POLICIES", reg)
    monkeypatch.setattr("salf.dynamic.policies.DYNAMIC_POLICIES", reg)
    settings = DynamicSettings(policy="halfway")
    assert settings.needs == set()
    run = RunShape(num_layers=4, total_steps=10, total_progress=10.0, max_eof=3)
    assert decide(settings, [Check(step=6, eof=1, progress=6.0)], run).eof == 3
    assert decide(settings, [Check(step=2, eof=1, progress=2.0)], run).eof == 1


def _halfway(settings, history, run):
    from salf.dynamic.policies import Decision

    now = history[-1]
    return Decision(run.max_eof if run.progress_share(now) >= 0.5 else now.eof, "halfway")
