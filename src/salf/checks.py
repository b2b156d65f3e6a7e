"""Cheap checks of `salf` arguments, run before any model loads.

A mistyped flag should cost a second, not a model load and a trace: salf.commands
runs `check_arguments(args)` before a verb's handler. Nothing here loads a model;
messages name the flags users typed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .config import TrainConfig
from .defaults import default_save_steps
from .errors import SalfError
from .io import ensure_out_dir, ensure_parent_dir

# The bounds of every option (argparse dest); unset (None) is fine. The training options'
# are TrainConfig's (salf.config), so `salf analyze/sweep --batch-size` obey the same ones.
_TRAIN_BOUNDS = TrainConfig.bounds()
# Smallest accepted value of each integer option.
AT_LEAST = {**{name: b["at_least"] for name, b in _TRAIN_BOUNDS.items() if "at_least" in b},
            "samples": 1, "max_targets": 1, "train_samples": 1, "eval_samples": 0,
            "test_samples": 1, "budget_steps": 1, "jobs": 1, "cell_timeout": 1, "lora_r": 1,
            "lora_alpha": 1, "freeze_below": 0}
# Largest accepted value (a seed must fit numpy's 32-bit generator, which transformers seeds).
AT_MOST = {name: b["at_most"] for name, b in _TRAIN_BOUNDS.items() if "at_most" in b}
# Options that must be a finite number above 0.
ABOVE_ZERO = tuple(name for name, b in _TRAIN_BOUNDS.items() if b.get("above_zero"))


def flag(dest: str) -> str:
    """The flag users type for an argparse dest: max_steps -> --max-steps."""
    return "--" + dest.replace("_", "-")


def check_numbers(args, name=flag) -> None:
    """Every numeric option the verb has, against AT_LEAST and ABOVE_ZERO; `name(dest)` is how
    a message names it (the flag; LoraSettings names its fields)."""
    for dest, least in AT_LEAST.items():
        value = getattr(args, dest, None)
        if value is not None and value < least:
            raise SalfError(f"{name(dest)} must be at least {least}, got {value}")
    for dest, most in AT_MOST.items():
        value = getattr(args, dest, None)
        if value is not None and value > most:
            raise SalfError(f"{name(dest)} must be at most {most}, got {value}")
    for dest in ABOVE_ZERO:
        value = getattr(args, dest, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SalfError(f"{name(dest)} must be a number above 0, got {value}")
    dropout = getattr(args, "lora_dropout", None)
    if dropout is not None and not 0 <= dropout < 1:
        raise SalfError(f"{name('lora_dropout')} must be at least 0 and below 1, got {dropout}")


def check_policy(policy: str) -> None:
    # the library's own parser, so the CLI accepts exactly what choose_cut does
    from .analysis.gains import parse_policy

    try:
        parse_policy(policy)
    except SalfError as exc:
        raise SalfError(f"--policy: {exc}") from None


def check_split(split: str) -> None:
    from .data import SPLITS

    if split not in SPLITS:
        raise SalfError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")


def _is_trained_folder(path: Path) -> bool:
    from .train.evaluate import META_FILE  # salf.train imports peft: only evaluate pays for it

    return (path / META_FILE).is_file()


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def check_model_spec(spec: str, trained_ok: bool = False) -> None:
    """--model names a built-in or tiny model, a model folder, or a hub id org/name.

    trained_ok: a folder written by `salf train` (final/, possibly a LoRA adapter) counts.
    """
    from .models import BUILTIN_MODELS, TINY_FAMILIES

    if spec in BUILTIN_MODELS or (spec.startswith("tiny-")
                                  and spec.removeprefix("tiny-") in TINY_FAMILIES):
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (trained_ok and _is_trained_folder(path)):
            return
        raise SalfError(f"--model {spec}: a folder without config.json, not a Hugging Face "
                        "model folder")
    if path.exists():
        raise SalfError(f"--model {spec} is a file, not a model folder")
    if _is_hub_id(spec):
        return
    raise SalfError(f"--model {spec!r}: unknown model: not a built-in (see `salf models list`), "
                    "not an existing folder, not a hub id org/name")


def check_dataset_spec(spec: str, flag: str = "--dataset") -> None:
    """A built-in dataset, an existing data file or folder, or a hub dataset (hf:NAME, org/name)."""
    from .data import BUILTIN_DATASETS
    from .data.files import FILE_EXTENSIONS, check_saved_dataset

    path = Path(spec).expanduser()
    if spec in BUILTIN_DATASETS:
        return
    if path.is_dir():
        check_saved_dataset(path, flag)
        return
    if path.is_file():
        if path.suffix.lower() not in FILE_EXTENSIONS:
            raise SalfError(f"{flag} {spec}: unknown file type {path.suffix!r}; use one of "
                            f"{', '.join(FILE_EXTENSIONS)}")
        return
    if spec.startswith("hf:") or (_is_hub_id(spec) and path.suffix.lower() not in FILE_EXTENSIONS):
        return
    raise SalfError(f"{flag} {spec!r}: not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                    "and no such file")


def check_plan_file(path: str) -> None:
    from .plan import FreezePlan

    FreezePlan.from_json(path)  # one SalfError naming the file unless it is a readable plan


def _plan_eof(path: str | None) -> int | None:
    """The cut of a plan file (None without one, or for a plan without a cut)."""
    if not path:
        return None
    from .plan import FreezePlan

    plan = FreezePlan.from_json(path)
    return None if plan.train_embeddings or plan.layers is not None else plan.eof


# Names only one verb writes into its --out folder: a folder holding one of them belongs to
# that verb, and another verb writing there would replace its plan.json or mix two runs.
OWN_OUTPUTS = {"analyze": ("trace.json",), "train": ("run.json", "checkpoints", "final"),
               "finetune": ("summary.json",), "sweep": ("sweep.json", "cells")}


def check_out_owner(out: str, verb: str) -> None:
    """--out may be new, empty, or a folder of this same verb; not another verb's outputs."""
    path = Path(out)
    for other, names in OWN_OUTPUTS.items():
        found = next((n for n in names if (path / n).exists()), None) if other != verb else None
        if found:
            raise SalfError(f"--out {out} holds the outputs of `salf {other}` ({found}); "
                            f"choose another folder for `salf {verb}`")


def check_no_checkpoints(out: Path, resume: bool) -> None:
    """Without --resume, a run folder must not hold checkpoints (training would refuse later)."""
    checkpoints = out / "checkpoints"
    if not resume and checkpoints.is_dir() and any(
            p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name) for p in checkpoints.iterdir()):
        raise SalfError(f"{checkpoints} holds checkpoints of an earlier run; pass --resume to "
                        "continue it, or choose another --out")


def dynamic_settings_of(args):
    """The DynamicSettings of --dynamic and its options (None without --dynamic)."""
    from .dynamic.settings import FLAGS, DynamicSettings

    given = {field: getattr(args, field) for field in FLAGS
             if field != "policy" and getattr(args, field, None) is not None}
    if getattr(args, "dynamic", None) is None:
        if given:
            raise SalfError(f"{FLAGS[next(iter(given))]} applies to --dynamic runs only")
        return None
    return DynamicSettings(policy=args.dynamic, **given)


def parse_int_list(text: str, what: str, least: int | None = None) -> list[int]:
    """The integers of a comma-separated option (each at least `least`), e.g. --cuts 0,15,22."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SalfError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise SalfError(f"{what} names no value")
    if least is not None and min(values) < least:
        raise SalfError(f"{what} must be at least {least}, got {min(values)}")
    return values


def parse_cuts(text: str) -> list[int] | None:
    """The sweep's --cuts: None for 'all' (every cut), [] for 'none' (full fine-tuning and
    the selectors' picks only, e.g. to compare a selector with full on a long run), else
    the listed eof values."""
    word = text.strip().lower()
    if word == "all":
        return None
    if word == "none":
        return []
    return parse_int_list(text, "--cuts", least=0)


# ---------------------------------------------------------------- one check per verb
def check_analyze(args) -> None:
    check_numbers(args)
    check_policy(args.policy)
    check_split(args.split)
    check_model_spec(args.model)
    check_dataset_spec(args.dataset)
    check_out_owner(args.out, "analyze")
    ensure_out_dir(args.out, "--out")


def check_plan(args) -> None:
    from .cluster import ENGINES

    check_policy(args.policy)
    if args.out:
        ensure_parent_dir(args.out, "--out")
    if args.ranks is not None and args.ranks < 1:
        raise SalfError(f"--ranks must be at least 1, got {args.ranks}")
    if args.engine is not None:
        if args.engine not in ENGINES:
            raise SalfError(f"--engine: unknown engine {args.engine!r}; choose from {', '.join(ENGINES)}")
        if args.ranks is None:
            raise SalfError("--engine applies with --ranks only")


def check_deepest_cut(settings, start_eof: int | None) -> None:
    """--deepest-cut below the starting cut is refused from the flags alone (its upper bound,
    the model's depth, is checked when the model is loaded)."""
    if settings is not None and settings.max_eof is not None and start_eof is not None \
            and settings.max_eof < start_eof:
        raise SalfError(f"--deepest-cut must be at least the starting cut {start_eof}, "
                        f"got {settings.max_eof}")


def train_config_of(args, lora=None):
    """The TrainConfig of train's and finetune's flags (`lora`: their LoraSettings, built by
    salf.commands); checked when made, its ConfigError names the field (salf.commands names
    the flag). Without --save-steps, a tenth of --max-steps (default_save_steps)."""
    given = {f.name: getattr(args, f.name) for f in TrainConfig.cli_fields() if hasattr(args, f.name)}
    given["save_steps"] = args.save_steps or default_save_steps(args.max_steps)
    return TrainConfig(**given, lora=lora,
                       allow_different_weights=getattr(args, "allow_different_weights", False))


def check_training_flags(args) -> None:
    """What train and finetune refuse from their flags alone: the TrainConfig they make, and
    --cache-prefix with --full (the library refuses it when the plan is applied)."""
    train_config_of(args)
    if args.cache_prefix and getattr(args, "full", False):
        raise SalfError("--cache-prefix needs a cut: full fine-tuning has no frozen prefix")


def check_train(args) -> None:
    check_numbers(args)
    check_training_flags(args)
    settings = dynamic_settings_of(args)
    if args.allow_different_weights and not args.plan:
        raise SalfError("--allow-different-weights applies to --plan only")
    if args.full and args.dynamic:
        raise SalfError("--dynamic moves a cut, and --full has none: use --plan or --freeze-below")
    check_model_spec(args.model)
    check_dataset_spec(args.dataset)
    if args.plan:
        check_plan_file(args.plan)
    check_deepest_cut(settings, args.freeze_below if args.freeze_below is not None
                      else _plan_eof(args.plan))
    check_out_owner(args.out, "train")
    check_no_checkpoints(Path(args.out), args.resume)
    ensure_out_dir(args.out, "--out")


def check_evaluate(args) -> None:
    check_numbers(args)
    check_split(args.split)
    check_model_spec(args.model, trained_ok=True)
    check_dataset_spec(args.dataset)
    if args.out:
        ensure_parent_dir(args.out, "--out")


def check_finetune(args) -> None:
    check_numbers(args)
    check_training_flags(args)
    dynamic_settings_of(args)
    check_policy(args.policy)
    check_model_spec(args.model)
    check_dataset_spec(args.dataset)
    check_out_owner(args.out, "finetune")
    check_no_checkpoints(Path(args.out) / "train", args.resume)
    ensure_out_dir(args.out, "--out")


def check_sweep(args) -> None:
    if args.report_only:  # reads OUT/sweep.json only
        return
    check_numbers(args)
    parse_cuts(args.cuts)
    from .sweep import check_sweep_arguments

    check_sweep_arguments(args)  # launcher, --seeds, --selectors
    check_model_spec(args.model)
    check_dataset_spec(args.dataset)
    check_out_owner(args.out, "sweep")
    ensure_out_dir(args.out, "--out")


def check_export(args) -> None:
    from .export import check_layers_path

    check_plan_file(args.plan)
    if args.layers_path is not None:
        check_layers_path(args.layers_path)
    if args.out:
        ensure_parent_dir(args.out, "--out")


CHECKS = {"analyze": check_analyze, "plan": check_plan, "train": check_train,
          "evaluate": check_evaluate, "finetune": check_finetune, "sweep": check_sweep,
          "export": check_export}


def check_arguments(args) -> None:
    """The checks of `args.verb` (models and datasets have nothing to check)."""
    check = CHECKS.get(args.verb)
    if check is not None:
        check(args)
