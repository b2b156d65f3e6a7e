"""The `salf` command line: help that matches the code, and one error line (exit 2) for bad input.

Bad-input cases run `python -m salf` in a subprocess, so the real exit code and stderr are
checked: exactly one line, starting `salf: error:`, and no traceback.
"""

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
from datafiles import reviews_csv as _csv

from salf import commands
from salf.cli import CLI_HEADS, build_parser, main
from salf.defaults import (DEFAULT_ANALYSIS_SAMPLES, DEFAULT_FINETUNE_STEPS,
                           DEFAULT_SAVE_TOTAL_LIMIT)

COLS = ["--text-col", "review", "--label-col", "label"]


def _fails(*argv, says: str):
    """Run `python -m salf ARGV`; it must fail with one `salf: error:` line containing `says`."""
    r = subprocess.run([sys.executable, "-m", "salf", *map(str, argv)], capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("salf: error:"), r.stderr
    assert says in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    """A tiny-llama analysis folder (trace.json, plan.json) and the CSV it read."""
    folder = tmp_path_factory.mktemp("analysis")
    data = _csv(folder)
    out = folder / "a"
    assert main(["analyze", "--model", "tiny-llama", "--dataset", str(data), *COLS,
                 "--samples", "8", "--out", str(out)]) == 0
    return out, data


# ---------------------------------------------------------------- help
def _parsers(parser, name="salf"):
    """(name, parser) for the parser and every subparser below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_verb_has_help():
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
            if "%(default)" in (action.help or "") and action.default is None:
                missing.append(f"{name} {action.dest}: shows 'None' as its default")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions
                            if not (c.help or "").strip()]
    assert not missing, missing


def test_every_verb_help_has_an_example():
    for name, parser in _parsers(build_parser()):
        if name != "salf":
            assert "example" in parser.format_help(), name


def test_help_states_the_defaults_the_code_uses():
    parser = build_parser()
    args = parser.parse_args(["finetune", "--model", "m", "--dataset", "d", "--out", "o"])
    assert args.samples == DEFAULT_ANALYSIS_SAMPLES and args.max_steps == DEFAULT_FINETUNE_STEPS
    assert args.save_total_limit == DEFAULT_SAVE_TOTAL_LIMIT
    helps = {n: p.format_help() for n, p in _parsers(parser)}
    ft = " ".join(helps["salf finetune"].split())
    assert f"analysis examples (default {DEFAULT_ANALYSIS_SAMPLES})" in ft
    assert f"optimizer steps (default {DEFAULT_FINETUNE_STEPS})" in ft
    assert f"{DEFAULT_ANALYSIS_SAMPLES} analysis examples, {DEFAULT_FINETUNE_STEPS} optimizer" in ft
    train = parser.parse_args(["train", "--model", "m", "--dataset", "d", "--full", "--out", "o"])
    assert train.max_steps is None and "--epochs decides" in helps["salf train"]
    from salf.analysis import VALID_POLICIES
    from salf.plan import HEADS

    for verb in ("analyze", "plan", "finetune"):
        for policy in VALID_POLICIES:
            assert policy in helps[f"salf {verb}"], (verb, policy)
    assert set(CLI_HEADS) <= set(HEADS)
    assert "OUT/cells/<cell>.json" in helps["salf sweep"]


def test_save_steps_default_follows_max_steps():
    parser = build_parser()
    base = ["train", "--model", "m", "--dataset", "d", "--full", "--out", "o"]
    assert commands.train_config(parser.parse_args(base)).save_steps == 200
    assert commands.train_config(parser.parse_args(base + ["--max-steps", "30"])).save_steps == 10
    assert commands.train_config(parser.parse_args(base + ["--max-steps", "500"])).save_steps == 50
    assert commands.train_config(parser.parse_args(base + ["--save-steps", "7"])).save_steps == 7


def test_report_to_offers_what_training_accepts():
    from salf.config import TrainConfig

    accepted = {f.name: f for f in dataclasses.fields(TrainConfig)}["report_to"].metadata["choices"]
    train = dict(_parsers(build_parser()))["salf train"]
    offered = next(a.choices for a in train._actions if a.dest == "report_to")
    assert set(offered) == set(accepted) == {"none", "tensorboard", "csv"}


def test_training_flags_come_from_train_config():
    """Every TrainConfig field with a flag is an option of train and finetune, with the field's
    help and the CLI's default; what the flags give back is a TrainConfig."""
    from salf.config import TrainConfig

    parsers = dict(_parsers(build_parser()))
    for verb in ("salf train", "salf finetune"):
        actions = {a.dest: a for a in parsers[verb]._actions}
        for f in TrainConfig.cli_fields():
            assert f.name in actions, (verb, f.name)
            assert actions[f.name].help == f.metadata["help"] or f.name in ("max_steps", "save_steps")
    args = build_parser().parse_args(["train", "--model", "m", "--dataset", "d", "--full", "--out", "o",
                                      "--loss", "lm", "--bf16", "--grad-accum", "3"])
    config = commands.train_config(args)
    assert (config.loss, config.bf16, config.grad_accum, config.batch_size, config.max_length,
            config.epochs) == ("lm", True, 3, 16, 96, 1.0)


def test_new_training_flags_reach_the_library():
    args = build_parser().parse_args(["finetune", "--model", "m", "--dataset", "d", "--out", "o",
                                      "--save-total-limit", "3", "--report-to", "csv"])
    config = commands.train_config(args)
    assert config.save_total_limit == 3 and config.report_to == "csv"


def test_models_list_names_every_tiny_model(capsys):
    from salf.models import TINY_FAMILIES

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-<family>" not in out
    for family in TINY_FAMILIES:
        assert f"tiny-{family}" in out


# ---------------------------------------------------------------- bad input: one line, exit 2
def test_usage_errors_are_one_line(tmp_path):
    _fails("train", "--model", "tiny-llama", "--dataset", "d", "--full", "--max-steps", "x",
           "--out", tmp_path / "t", says="--max-steps")
    _fails("analyze", "--dataset", "d", "--out", tmp_path / "a", says="--model")


@pytest.mark.parametrize("flag, value, says", [
    ("--max-steps", "0", "--max-steps must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--grad-accum", "0", "--grad-accum must be at least 1"),
    ("--epochs", "0", "--epochs must be a number above 0"),
    ("--lr", "0", "--lr must be a number above 0"),
    ("--lr", "nan", "--lr must be a number above 0"),
    ("--save-steps", "0", "--save-steps must be at least 1"),
    ("--save-total-limit", "0", "--save-total-limit must be at least 1"),
    ("--train-samples", "0", "--train-samples must be at least 1"),
    ("--lora-dropout", "1.5", "--lora-dropout"),
])
def test_numbers_out_of_range_name_their_flag(tmp_path, flag, value, says):
    _fails("train", "--model", "tiny-llama", "--dataset", "rotten-tomatoes", "--full", flag, value,
           "--out", tmp_path / "t", says=says)


def test_sweep_and_analyze_numbers(tmp_path):
    _fails("sweep", "--model", "tiny-llama", "--dataset", "rotten-tomatoes", "--jobs", "0",
           "--out", tmp_path / "s", says="--jobs must be at least 1, got 0")
    _fails("sweep", "--model", "tiny-llama", "--dataset", "rotten-tomatoes", "--save-steps", "0",
           "--out", tmp_path / "s", says="--save-steps must be at least 1, got 0")
    _fails("sweep", "--model", "tiny-llama", "--dataset", "rotten-tomatoes", "--cell-timeout", "0",
           "--out", tmp_path / "s", says="--cell-timeout must be at least 1, got 0")
    _fails("sweep", "--model", "tiny-llama", "--dataset", "rotten-tomatoes", "--cuts", "0,-2",
           "--out", tmp_path / "s", says="--cuts must be at least 0")
    _fails("analyze", "--model", "tiny-llama", "--dataset", "rotten-tomatoes", "--samples", "0",
           "--out", tmp_path / "a", says="--samples must be at least 1, got 0")


def test_out_under_a_file_is_refused_before_any_model_loads(tmp_path):
    data = _csv(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    # a model folder that cannot load: only a check before the model load can name --out
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _fails("analyze", "--model", broken, "--dataset", data, *COLS, "--out", blocker / "a",
           says="--out")
    _fails("train", "--model", broken, "--dataset", data, *COLS, "--full", "--out",
           blocker / "t", says="--out")
    _fails("finetune", "--model", broken, "--dataset", data, *COLS, "--out", blocker / "f",
           says="--out")


def test_plan_out_under_a_file(tmp_path, analysis):
    out, _ = analysis
    blocker = tmp_path / "blocker"
    blocker.write_text("x\n")
    _fails("plan", "--trace", out / "trace.json", "--out", blocker / "p.json", says="--out")


def test_bad_policy_model_and_dataset_are_named(tmp_path):
    data = _csv(tmp_path)
    _fails("analyze", "--model", "tiny-llama", "--dataset", data, *COLS, "--policy", "deepest",
           "--out", tmp_path / "a", says="--policy: unknown policy 'deepest'")
    _fails("analyze", "--model", "tiny-llama", "--dataset", data, *COLS, "--policy", "budget=0",
           "--out", tmp_path / "a", says="--policy")
    _fails("analyze", "--model", "tiny-nosuchfamily", "--dataset", data, *COLS,
           "--out", tmp_path / "a", says="unknown model")
    _fails("train", "--model", "tiny-llama", "--dataset", tmp_path / "missing.csv", "--full",
           "--out", tmp_path / "t", says="--dataset")
    assert not (tmp_path / "a").exists() and not (tmp_path / "t").exists()


def test_existing_checkpoints_without_resume_name_the_flag(tmp_path):
    (tmp_path / "t" / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    _fails("train", "--model", "tiny-llama", "--dataset", _csv(tmp_path), *COLS, "--full",
           "--out", tmp_path / "t", says="--resume")


def _final_folder(folder):
    """A `salf train`-style final/ folder: a tiny model, its tokenizer and salf.json."""
    from salf.models import load_model

    model, tok, _ = load_model("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "salf.json").write_text(json.dumps({"base": "tiny-llama"}))
    return folder


def test_evaluate_a_folder_without_or_with_truncated_weights(tmp_path):
    data = _csv(tmp_path)
    final = _final_folder(tmp_path / "final")
    weights = final / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[:len(blob) // 2])
    line = _fails("evaluate", "--model", final, "--dataset", data, *COLS, "--samples", "4",
                  says=str(final))
    assert "cannot load the trained model" in line
    weights.unlink()
    line = _fails("evaluate", "--model", final, "--dataset", data, *COLS, "--samples", "4",
                  says=str(final))
    assert "no model weights" in line


@pytest.mark.parametrize("field, change, says", [
    ("deviation", lambda d: d["spaces"][2].update(deviation="abc"), "spaces[2].deviation"),
    ("num_layers", lambda d: d.update(num_layers="four"), "num_layers must be a positive integer"),
    ("spaces", lambda d: d.update(spaces=5), "spaces must be a list"),
    ("task", lambda d: d.update(task="regression"), "task must be classification or sft"),
    ("cost settings", lambda d: d["extra"]["cost"].update(settings={}), "has no settings"),
])
def test_plan_on_a_malformed_trace(tmp_path, analysis, field, change, says):
    out, _ = analysis
    trace = json.loads((out / "trace.json").read_text())
    change(trace)
    bad = tmp_path / "trace.json"
    bad.write_text(json.dumps(trace))
    line = _fails("plan", "--trace", bad, says=says)
    assert str(bad) in line


def test_plan_for_other_weights_needs_allow_different_weights(tmp_path, analysis):
    out, data = analysis
    plan = json.loads((out / "plan.json").read_text())
    plan["model"]["weights_hash"] = "0123456789abcdef"  # as if made on other weights
    other = tmp_path / "plan.json"
    other.write_text(json.dumps(plan))
    argv = ["train", "--model", "tiny-llama", "--dataset", str(data), *COLS, "--plan", str(other),
            "--max-steps", "1", "--batch-size", "4", "--eval-samples", "0"]
    line = _fails(*argv, "--out", tmp_path / "refused", says="weights_hash differs")
    assert "--allow-different-weights" in line and "allow_different_weights" not in line
    assert main([*argv, "--allow-different-weights", "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["train"]["steps"] == 1
    _fails("train", "--model", "tiny-llama", "--dataset", data, *COLS, "--full",
           "--allow-different-weights", "--out", tmp_path / "x", says="--plan only")
