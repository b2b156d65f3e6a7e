"""The options of a training run as one object (import-light: `salf --help` reads it).

`TrainConfig` holds every option of `salf.train.train`. Each field's metadata says

    flag, help, metavar, choices, cli_default   how `salf train/finetune` offer it (the CLI's
                                                option group is generated from them)
    at_least, at_most, above_zero               its bounds (salf.checks reads them too)
    resume                                      a resumed run must share it (run.json)
    record                                      run.json records it (False: this call only)

It is validated once, when made (`__post_init__`): a `ConfigError` names the field
(`batch_size must be at least 1, got 0`); the CLI prints the same error with the flag the
user typed (`--batch-size must be at least 1, got 0`, ConfigError.cli_message).
run.json holds `TrainConfig.record()` as it is, beside what the run adds (plan, row counts,
processes, callbacks). See docs/training.md.

`TraceConfig` holds every option of one analysis (`salf.pipeline.analyze`, the trace of
`salf.analysis.trace`, the cut policy) the same way; its `cli_group` metadata says where the
CLI offers a flag ("analysis": the group `salf analyze` and `salf finetune` share, "analyze":
`salf analyze`'s own options).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .choices import CUT_POLICIES
from .defaults import (DEFAULT_ANALYSIS_SAMPLES, DEFAULT_MAX_LENGTH, DEFAULT_POLICY,
                       DEFAULT_SAVE_TOTAL_LIMIT, REPORT_TO)
from .errors import ConfigError, SalfError
from .plan import HEADS


# a seed must fit numpy's 32-bit generator, which transformers seeds
MAX_SEED = 2**32 - 1
LOSSES = ("label", "lm")
DEFAULT_LR = {"lora": 2e-4, "full": 5e-5}
NO_FLAG = None
# Temperature of the label-set softmax over cosines. Cosines live in [-1, 1], so
# TAU = 0.1 spreads them over a logit range of 20: a cosine lead of 0.1 is one nat.
# A fixed constant (not fitted) so label_ce values are comparable across spaces,
# models and runs (salf.analysis.TAU).
TAU = 0.1
# The heads a flag can ask for. "untied-copy" trains the head of tied and untied models
# alike, so the flags leave out "trainable" (refused on tied models; plans may hold it).
CLI_HEADS = tuple(h for h in HEADS if h != "trainable")


def option(default, help: str, *, flag: str | None = "", **meta):
    """A config field: its default and metadata (see the module docstring). `flag` ""
    is the field's own name as a flag (max_steps -> --max-steps); None: no CLI flag."""
    return field(default=default, metadata=MappingProxyType({"help": help, "flag": flag, **meta}))


def flag_of(name: str, metadata=None) -> str:
    """The flag users type for an option: max_steps -> --max-steps (or the field's own flag)."""
    given = (metadata or {}).get("flag")
    return given or "--" + name.replace("_", "-")


@dataclass
class LoraSettings:
    """LoRA on the trainable layers (eof+1..L). `target_modules=None` picks every
    linear projection (attention + MLP) found in those layers. Checked when made (`validate`).
    Its fields' metadata give `salf train/finetune` their --lora-* options (`dest`: the
    option's name in the parsed arguments)."""

    r: int = option(16, "LoRA rank (default %(default)s)", flag="--lora-r", dest="lora_r")
    alpha: int = option(32, "LoRA scaling numerator: updates scale by alpha/r (default %(default)s)",
                        flag="--lora-alpha", dest="lora_alpha")
    dropout: float = option(0.05, "dropout on the LoRA input (default %(default)s)",
                            flag="--lora-dropout", dest="lora_dropout")
    target_modules: list[str] | None = option(None, "comma-separated module names (default: every "
                                              "attention/MLP projection)", flag="--lora-targets",
                                              dest="lora_targets", metavar="LORA_TARGETS")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "LoraSettings":
        """Raise SalfError naming the field unless every field has its type and is within the
        CLI's limits for --lora-r, --lora-alpha and --lora-dropout; returns self."""
        from .checks import check_numbers

        for name in ("r", "alpha"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise SalfError(f"lora.{name} must be an integer, got {value!r}")
        if not isinstance(self.dropout, numbers.Real) or isinstance(self.dropout, bool):
            raise SalfError(f"lora.dropout must be a number, got {self.dropout!r}")
        targets = self.target_modules
        # a bare string would be split into letters by list(targets)
        if targets is not None and not (isinstance(targets, (list, tuple))
                                        and all(isinstance(t, str) for t in targets)):
            raise SalfError(f"lora.target_modules must be a list of module names or None, got {targets!r}")
        check_numbers(types.SimpleNamespace(lora_r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout),
                      name=lambda dest: "lora." + dest.removeprefix("lora_"))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "LoraSettings | None":
        if d is None:
            return None
        unknown = sorted(str(k) for k in d if k not in LORA_FIELDS)
        if unknown:
            raise SalfError(f"unknown LoRA setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(LORA_FIELDS)}")
        return cls(**d)


LORA_FIELDS = tuple(f.name for f in dataclasses.fields(LoraSettings))


@dataclass(frozen=True)
class TrainConfig:
    """Every option of one training run (salf.train.train); checked when made.

    `lr` None: 2e-4 with LoRA, 5e-5 otherwise (`learning_rate`). `max_steps` (if given)
    overrides `epochs`. With `save_steps`, checkpoints go to OUT/checkpoints, of which the
    newest `save_total_limit` are kept (None: all); `resume` continues from the newest good
    one. `report_to`: "none", "tensorboard" or "csv" (OUT/train_log.csv). `lora`: a
    salf.train.LoraSettings (or its dict). `allow_different_weights` applies a plan made
    for other weights (see `apply_plan`). `base_spec`: the model spec final/salf.json names
    (default: the plan's model). Under a launcher `batch_size` is per process.
    """

    epochs: float = option(1, "epochs (default %(default)s; --max-steps overrides)",
                           above_zero=True, resume=True, cli_default=1.0)
    max_steps: int | None = option(None, "stop after N optimizer steps", metavar="N", at_least=1,
                                   resume=True)
    lr: float | None = option(None, "learning rate (default 2e-4 with LoRA, 5e-5 otherwise)",
                              above_zero=True, resume=True)
    batch_size: int = option(8, "per-device batch (default %(default)s)", at_least=1, resume=True,
                             cli_default=16)
    grad_accum: int = option(1, "gradient accumulation steps (default %(default)s)", at_least=1,
                             resume=True)
    max_length: int = option(DEFAULT_MAX_LENGTH, "tokens per example (default %(default)s)",
                             at_least=2, resume=True, cli_default=96)
    eval_steps: int | None = option(None, "evaluate every N steps (default: once, after training)",
                                    metavar="N", at_least=1)
    save_steps: int | None = option(None, "checkpoint every N steps", metavar="N", at_least=1)
    save_total_limit: int | None = option(
        DEFAULT_SAVE_TOTAL_LIMIT, "keep only the newest N checkpoints (default %(default)s)",
        metavar="N", at_least=1)
    bf16: bool = option(False, "bf16 mixed precision (GPU)", resume=True)
    gradient_checkpointing: bool = option(
        False, "recompute activations of the trainable layers (never the frozen ones)", resume=True)
    cache_prefix: bool = option(
        False, "run the frozen prefix once per training example and replay it in later epochs "
               "(needs a cut; pays off with --epochs > 1; memory: tokens x hidden x 4 bytes)")
    loss: str = option("label", "classification loss: label token only, or full-sequence LM "
                                "(default %(default)s)", choices=LOSSES, resume=True)
    seed: int = option(0, "seed of the data order, LoRA's initial weights and the row samples "
                          "(default %(default)s)", at_least=0, at_most=MAX_SEED, resume=True)
    resume: bool = option(False, "continue from the last complete checkpoint in --out", record=False)
    report_to: str = option("none", "per-step numbers also to TensorBoard or a CSV file in --out "
                                    "(default %(default)s)", choices=REPORT_TO)
    # no flag: the CLI builds it from --lora and its options
    lora: LoraSettings | None = option(None, "LoRA on the trainable layers (salf.train.LoraSettings)",
                          flag=NO_FLAG, resume=True)
    weight_decay: float = option(0.0, "AdamW weight decay", flag=NO_FLAG, at_least=0, resume=True)
    warmup_steps: int = option(0, "learning-rate warm-up steps", flag=NO_FLAG, at_least=0,
                               resume=True)
    progress: bool = option(True, "progress bars", flag=NO_FLAG, record=False)
    base_spec: str | None = option(None, "the model spec final/salf.json names", flag=NO_FLAG,
                                   record=False)
    allow_different_weights: bool = option(False, "apply a plan made on other weights of the "
                                                  "same shape", flag=NO_FLAG, record=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _checked(f, getattr(self, f.name))
            if value is not getattr(self, f.name):
                object.__setattr__(self, f.name, value)
        object.__setattr__(self, "lora", _lora(self.lora))
        if self.cache_prefix and self.loss == "lm":
            raise ConfigError("cache_prefix", "supports the label/SFT loss, not the full-sequence "
                                              "'lm' loss (its extra label token has no cached state)")
        if self.report_to == "tensorboard":
            _check_tensorboard()

    @property
    def learning_rate(self) -> float:
        """`lr`, or the default for this run (2e-4 with LoRA, 5e-5 otherwise)."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR["lora" if self.lora is not None else "full"]

    def record(self) -> dict:
        """What run.json records of this config: every field whose metadata says so, LoRA as
        its dict and the learning rate the run uses."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("record", True)}
        out["lora"] = self.lora.to_dict() if self.lora is not None else None
        out["lr"] = self.learning_rate
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from `record()`'s dict (run.json; keys of the run that are not fields
        are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def resume_fields(cls) -> tuple[str, ...]:
        """The fields a resumed run must share with the run it continues."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume"))

    @classmethod
    def bounds(cls) -> dict[str, dict]:
        """{field: {"at_least"/"at_most"/"above_zero": value}} of every bounded field."""
        keys = ("at_least", "at_most", "above_zero")
        out = {f.name: {k: f.metadata[k] for k in keys if k in f.metadata} for f in dataclasses.fields(cls)}
        return {name: b for name, b in out.items() if b}

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        """The fields the CLI offers as flags, in order."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("flag") is not None]


@dataclass(frozen=True)
class TraceConfig:
    """Every option of one analysis (salf.pipeline.analyze; salf.analysis.trace reads the
    trace's part); checked when made.

    The sample: `samples` rows (None: all) of `split`, drawn with `seed`, encoded in batches
    of `batch_size` x `max_length` tokens. The trace: at most `max_targets` response
    positions per SFT example (None: all; drawn with `seed`), `logit_lens` (True: at every
    space, "last": at the output space only), `tau`, `position_ids_from_mask`,
    `basis_cache_dir`, `target_cosines` and `progress` (salf.analysis.trace). The task:
    `task_kind` ("classification", "sft", a task object, or None: from the batches) and
    `label_token_ids` (classification; `analyze` takes both from the dataset). The plan:
    `policy` picks the cut, `head` is the plan's head, priced for a training run of
    `train_batch_size` x `train_max_length` tokens.

    Metadata besides TrainConfig's: `none_ok` (None is accepted: no limit), `words` (strings
    accepted besides the type's values: logit_lens="last"), `cli_choices` (the CLI offers
    fewer choices than the library takes) and `cli_group` (module doc).
    """

    samples: int | None = option(DEFAULT_ANALYSIS_SAMPLES, "analysis examples (default %(default)s)",
                                 at_least=1, none_ok=True)
    policy: str = option(DEFAULT_POLICY, "how to choose the cut: "
                         f"{' | '.join(CUT_POLICIES.labels())} (B = max predicted training cost "
                         "relative to full fine-tuning, e.g. budget=0.5; docs/method.md); "
                         "default %(default)s", metavar="POLICY")
    max_targets: int | None = option(16, "SFT: response positions sampled per example (default "
                                         "%(default)s)", at_least=1, none_ok=True)
    logit_lens: bool | str = option(False, "also record full-vocabulary logit-lens cross-entropy "
                                           "per space", words=("last",))
    head: str = option("frozen", "output head: keep it frozen, or train an untied copy (V x d "
                                 "parameters); default %(default)s", choices=HEADS,
                       cli_choices=CLI_HEADS)
    split: str = option("train", "split the analysis reads (default %(default)s)",
                        cli_group="analyze")
    batch_size: int = option(8, "analysis batch size (default %(default)s)", at_least=1,
                             cli_group="analyze")
    max_length: int = option(128, "tokens per example (default %(default)s)", at_least=2,
                             cli_group="analyze")
    seed: int = option(0, "seed of the analysis sample and SFT target positions (default "
                          "%(default)s)", at_least=0, at_most=MAX_SEED, cli_group="analyze")
    train_batch_size: int = option(16, "batch of the training run the cost model prices",
                                   flag=NO_FLAG, at_least=1)
    train_max_length: int = option(96, "tokens per example of that training run", flag=NO_FLAG,
                                   at_least=1)
    task_kind: object = option(None, "classification, sft, a task, or None (from the batches)",
                               flag=NO_FLAG)
    label_token_ids: list | None = option(None, "first-token id of every label, in label order",
                                          flag=NO_FLAG)
    tau: float = option(TAU, "temperature of the label-set softmax over cosines", flag=NO_FLAG,
                        above_zero=True)
    position_ids_from_mask: bool = option(True, "position ids from the attention mask (left "
                                                "padding shifts no position)", flag=NO_FLAG)
    basis_cache_dir: str | Path | None = option(None, "where the semantic basis is cached",
                                                flag=NO_FLAG)
    target_cosines: bool = option(False, "keep every target's cosine (extra.target_cosines)",
                                  flag=NO_FLAG)
    progress: bool = option(True, "progress bars", flag=NO_FLAG)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (value is None and f.metadata.get("none_ok")) or \
                    (isinstance(value, str) and value in f.metadata.get("words", ())):
                continue  # None (no limit) or a word the field takes besides its type's values
            checked = _checked(f, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)

    @classmethod
    def with_options(cls, config: "TraceConfig | None", options: dict, caller: str) -> "TraceConfig":
        """`config` (None: the defaults) with `options`, a caller's keyword arguments named as
        fields, replaced; a TypeError names a keyword that is no field."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"{caller}(): config must be a TraceConfig, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in options if k not in names]
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        config = config if config is not None else cls()
        return dataclasses.replace(config, **options) if options else config

    @classmethod
    def cli_fields(cls, group: str | None = None) -> list[dataclasses.Field]:
        """The fields the CLI offers as flags, in order; with `group`, those of that
        `cli_group` ("analysis", the default, or "analyze")."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("flag") is not None
                and group in (None, f.metadata.get("cli_group", "analysis"))]


def _number_kind(f: dataclasses.Field) -> type | None:
    """int, float or bool for a field of that type (its annotation), else None."""
    kind = str(f.type).split("|")[0].strip()
    return {"int": int, "float": float, "bool": bool}.get(kind)


def _checked(f: dataclasses.Field, value):
    """`value` checked against the field's type, choices and bounds (an int-valued field
    becomes a plain int); ConfigError naming the field."""
    kind, meta = _number_kind(f), f.metadata
    if value is None or kind is None:
        if value is None and kind is not None and f.default is not None:
            raise ConfigError(f.name, f"must be {'a number' if kind is not bool else 'True or False'}, "
                                      "got None")
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f.name, f"must be one of {', '.join(map(str, meta['choices']))}, "
                                      f"not {value!r}")
        return value
    if kind is bool:
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind is int else numbers.Real):
        raise ConfigError(f.name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is int:
        value = int(value)
    return _bounded(f.name, value, meta)


def _bounded(name: str, value, meta):
    if "at_least" in meta and value < meta["at_least"]:
        raise ConfigError(name, f"must be at least {meta['at_least']}, got {value}")
    if "at_most" in meta and value > meta["at_most"]:
        raise ConfigError(name, f"must be at most {meta['at_most']}, got {value}")
    if meta.get("above_zero") and not (math.isfinite(value) and value > 0):
        raise ConfigError(name, f"must be a number above 0, got {value}")
    return value


def _lora(value):
    """A LoraSettings from itself, its dict or None."""
    if value is None or hasattr(value, "to_dict"):
        return value
    if isinstance(value, dict):
        return LoraSettings.from_dict(value)
    raise ConfigError("lora", f"must be a LoraSettings, its dict or None, got {value!r}")


def _check_tensorboard() -> None:
    """tensorboard needs its package: refused before training (and before a model loads)."""
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise ConfigError("report_to", "tensorboard needs the tensorboard package (pip install tensorboard)")
