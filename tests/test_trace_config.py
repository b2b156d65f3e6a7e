"""TraceConfig (salf.config): the analysis options as one object, checked once when made
(errors name the field; the CLI names the flag), the `salf analyze`/`finetune` flags generated
from it as they were written by hand, and traces, analyses and figures that are the same
through the config as through the keyword arguments of before (issue #23)."""

import argparse
import json

import pytest
import torch
from datafiles import reviews_csv

from salf import checks, commands
from salf.analysis import TAU, Trace, TraceMeta, trace
from salf.cli import CLI_HEADS, build_parser, main
from salf.config import TraceConfig
from salf.defaults import DEFAULT_ANALYSIS_SAMPLES, DEFAULT_POLICY
from salf.errors import ConfigError, SalfError
from salf.models.anatomy import anatomy
from salf.models.tiny import TINY_VOCAB, tiny_model

LABELS = [17, 42]


# ---------------------------------------------------------------- the config
@pytest.mark.parametrize("kwargs, says, flag_says", [
    ({"samples": 0}, "samples must be at least 1, got 0", "--samples must be at least 1, got 0"),
    ({"max_targets": 0}, "max_targets must be at least 1, got 0", "--max-targets must be at least 1"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0", "--batch-size must be at least 1"),
    ({"max_length": 1}, "max_length must be at least 2, got 1", "--max-length must be at least 2"),
    ({"seed": -1}, "seed must be at least 0, got -1", "--seed must be at least 0"),
    ({"seed": 2**32}, "seed must be at most 4294967295", "--seed must be at most"),
    ({"head": "bogus"}, "head must be one of frozen, trainable, untied-copy, not 'bogus'",
     "--head must be one of"),
    ({"samples": "8"}, "samples must be an integer, got '8'", "--samples must be an integer"),
    ({"tau": 0.0}, "tau must be a number above 0, got 0.0", "--tau must be a number above 0"),
    ({"max_targets": 2.5}, "max_targets must be an integer, got 2.5", "--max-targets must be"),
])
def test_a_bad_option_is_one_error_naming_the_field(kwargs, says, flag_says):
    with pytest.raises(ConfigError) as err:
        TraceConfig(**kwargs)
    assert says in str(err.value) and isinstance(err.value, SalfError)
    assert err.value.cli_message().startswith(flag_says)


def test_defaults_and_the_values_besides_the_type():
    c = TraceConfig()
    assert (c.samples, c.policy, c.max_targets, c.logit_lens, c.head) == \
        (DEFAULT_ANALYSIS_SAMPLES, DEFAULT_POLICY, 16, False, "frozen")
    assert (c.split, c.batch_size, c.max_length, c.seed, c.tau) == ("train", 8, 128, 0, TAU)
    assert (c.train_batch_size, c.train_max_length, c.progress) == (16, 96, True)
    assert TraceConfig(logit_lens="last").logit_lens == "last"      # the output space only
    assert TraceConfig(logit_lens=1).logit_lens is True
    assert TraceConfig(samples=None, max_targets=None).max_targets is None   # no limit
    assert TraceConfig(head="trainable").head == "trainable"      # the library takes every head


def test_options_replace_fields_and_a_wrong_keyword_is_a_type_error():
    base = TraceConfig(samples=8)
    assert TraceConfig.with_options(base, {"seed": 3}, "analyze") == TraceConfig(samples=8, seed=3)
    assert TraceConfig.with_options(None, {}, "analyze") == TraceConfig()
    with pytest.raises(TypeError, match="analyze.. got an unexpected keyword argument 'sampels'"):
        TraceConfig.with_options(base, {"sampels": 8}, "analyze")
    with pytest.raises(TypeError, match="config must be a TraceConfig"):
        TraceConfig.with_options({"samples": 8}, {}, "analyze")


# ---------------------------------------------------------------- the CLI
# The analysis flags as they were written by hand before TraceConfig generated them:
# flag -> (dest, default, type, choices, metavar, help)
SHARED = {
    "--samples": ("samples", DEFAULT_ANALYSIS_SAMPLES, int, None, None,
                  "analysis examples (default %(default)s)"),
    "--policy": ("policy", DEFAULT_POLICY, str, None, "POLICY", None),
    "--max-targets": ("max_targets", 16, int, None, None,
                      "SFT: response positions sampled per example (default %(default)s)"),
    "--logit-lens": ("logit_lens", False, None, None, None,
                     "also record full-vocabulary logit-lens cross-entropy per space"),
    "--head": ("head", "frozen", str, CLI_HEADS, None,
               "output head: keep it frozen, or train an untied copy (V x d parameters); "
               "default %(default)s"),
}
ANALYZE_ONLY = {
    "--split": ("split", "train", str, None, None, "split the analysis reads (default %(default)s)"),
    "--batch-size": ("batch_size", 8, int, None, None, "analysis batch size (default %(default)s)"),
    "--max-length": ("max_length", 128, int, None, None, "tokens per example (default %(default)s)"),
    "--seed": ("seed", 0, int, None, None,
               "seed of the analysis sample and SFT target positions (default %(default)s)"),
}


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


def _options(group) -> dict:
    return {a.option_strings[0]: a for a in group._group_actions if a.option_strings}


@pytest.mark.parametrize("verb", ["analyze", "finetune"])
def test_the_generated_flags_are_the_ones_written_by_hand(verb):
    parser = _verb_parser(verb)
    groups = {g.title: g for g in parser._action_groups}
    expected = [("analysis", SHARED)] + ([("options", ANALYZE_ONLY)] if verb == "analyze" else [])
    for title, flags in expected:
        actions = _options(groups[title])
        for flag, (dest, default, kind, choices, metavar, help) in flags.items():
            a = actions[flag]
            assert (a.dest, a.default, a.choices, a.metavar) == (dest, default, choices, metavar), flag
            assert a.type in (kind, None) and (help is None or a.help == help), flag
    assert list(_options(groups["analysis"])) == list(SHARED)
    assert "how to choose the cut: max-gain-e0 |" in _options(groups["analysis"])["--policy"].help
    assert isinstance(_options(groups["analysis"])["--logit-lens"], argparse._StoreTrueAction)


def test_a_config_error_names_the_flag_and_exits_2(monkeypatch, capsys, tmp_path):
    data = reviews_csv(tmp_path, 20)
    argv = ["analyze", "--model", "tiny-llama", "--dataset", str(data), "--out", str(tmp_path / "a")]
    # the cheap checks catch it first (as before) ...
    assert main([*argv, "--max-targets", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        ["salf: error: --max-targets must be at least 1, got 0"]
    # ... and the TraceConfig the handler makes says the same, naming the flag
    monkeypatch.setattr(checks, "check_arguments", lambda args: None)
    assert main([*argv, "--seed", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        ["salf: error: --seed must be at least 0, got -1"]


def test_the_config_of_the_flags():
    args = _verb_parser("analyze").parse_args(["--model", "m", "--dataset", "d", "--out", "o",
                                               "--samples", "8", "--logit-lens", "--seed", "3"])
    args.verb = "analyze"
    assert commands.trace_config(args) == TraceConfig(samples=8, logit_lens=True, seed=3)
    ft = _verb_parser("finetune").parse_args(["--model", "m", "--dataset", "d", "--out", "o",
                                              "--max-targets", "4", "--seed", "9"])
    ft.verb = "finetune"
    assert commands.trace_config(ft) == TraceConfig(max_targets=4)  # --seed is training's there


# ---------------------------------------------------------------- same results
def _cls_batch(B=6, T=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, TINY_VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        ids[b, :b % 4] = 0
        mask[b, :b % 4] = 0
    li = torch.arange(B) % len(LABELS)
    return {"input_ids": ids, "attention_mask": mask, "target_ids": torch.tensor(LABELS)[li],
            "label_index": li}


def _sft_batch(B=3, T=24, prompt=6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY_VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}


def _same(a: dict, b: dict) -> dict:
    """Trace (or plan) dicts without what a run measures about its own time."""
    for d in (a, b):
        d.pop("timing", None), d.pop("created", None)
    assert json.dumps(a) == json.dumps(b)
    return a


def test_a_trace_through_the_config_equals_the_old_keywords():
    model = tiny_model("llama")
    anat = anatomy(model)
    old = trace(model, anat, [_cls_batch()], "classification", label_token_ids=LABELS,
                logit_lens=True, progress=False, model_info={"spec": "m"}, data_info={"d": 1},
                extra={"x": 2})
    new = trace(model, anat, [_cls_batch()],
                TraceConfig(task_kind="classification", label_token_ids=LABELS, logit_lens=True,
                            progress=False),
                meta=TraceMeta(model={"spec": "m"}, data={"d": 1}, extra={"x": 2}))
    d = _same(old.to_dict(), new.to_dict())
    assert d["settings"]["logit_lens"] is True and d["extra"] == {"x": 2}

    old = trace(model, anat, [_sft_batch()], "sft", max_targets_per_example=4, logit_lens="last",
                progress=False, seed=5, target_cosines=True)
    new = trace(model, anat, [_sft_batch()],
                TraceConfig(task_kind="sft", max_targets=4, logit_lens="last", progress=False,
                            seed=5, target_cosines=True))
    written = new.to_dict()
    assert Trace.from_dict(json.loads(json.dumps(written))).to_dict() == written   # reads back
    d = _same(old.to_dict(), written)
    assert d["settings"]["max_targets_per_example"] == 4 and d["settings"]["logit_lens"] == "last"
    with pytest.raises(ConfigError, match="max_targets must be at least 1"):
        trace(model, anat, [_sft_batch()], "sft", max_targets_per_example=0, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_target'"):
        trace(model, anat, [_sft_batch()], "sft", max_target=4)


def test_an_analysis_through_the_config_equals_the_old_keywords(tmp_path):
    from salf.models import load_model
    from salf.pipeline import analyze

    loaded = load_model("tiny-llama")
    data = str(reviews_csv(tmp_path, 40))
    kw = dict(data_kwargs={"text_col": "review", "label_col": "label"}, loaded=loaded)
    old = analyze("tiny-llama", data, samples=8, seed=2, logit_lens=True, policy="paper",
                  batch_size=4, progress=False, **kw)
    new = analyze("tiny-llama", data, config=TraceConfig(samples=8, seed=2, logit_lens=True,
                                                         policy="paper", batch_size=4,
                                                         progress=False), **kw)
    _same(old.trace.to_dict(), new.trace.to_dict())
    _same(old.plan.to_dict(), new.plan.to_dict())
    with pytest.raises(TypeError, match="unexpected keyword argument 'sampels'"):
        analyze("tiny-llama", data, sampels=8, **kw)


def test_salf_analyze_checks_its_options_before_reading_anything():
    import salf

    with pytest.raises(ConfigError, match="samples must be at least 1, got 0"):
        salf.analyze(tiny_model("llama"), [{"text": "never read"}], samples=0)


def test_the_figure_from_its_series(tmp_path):
    import matplotlib.pyplot as plt

    from salf.report.plots import TraceSeries, plot_trace, trace_figure

    L = 4
    series = TraceSeries(title="t", deviation=[1.0, 0.9, 0.8, 0.6, 0.5],
                         gains=[0.1, 0.1, 0.2, 0.1], eof=2, cost=[1.0, 0.8, 0.6, 0.4],
                         benefit=[0.1, 0.2, 0.1, 0.0])
    fig = trace_figure(series, lens_accuracy=[0.5] * (L + 1), chance=0.5)   # fields replace
    assert len(fig.axes) == 4 and fig._suptitle.get_text() == "t"
    plt.close(fig)
    assert plot_trace(tmp_path / "t.png", series).stat().st_size > 10_000
