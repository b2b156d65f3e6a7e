"""What a sweep runs: its settings (`SweepConfig`) and the selectors' names.

A selector is a SALF cut policy (salf.choices.CUT_POLICIES, `budget=B` too), a baseline
selector (salf.choices.BASELINE_SELECTORS: a prefix cut or a layer set) or a moving cut
"dyn-<policy>[:key=value...]"; `salf` stands for the default policy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from types import MappingProxyType

from ..choices import BASELINE_SELECTORS, CUT_POLICIES
from ..config import CLI_HEADS, option
from ..defaults import DEFAULT_POLICY
from ..distributed import launched
from ..errors import SalfError

# SALF's cut policies, each a selector under its own name (budget=B too); `salf` stands for
# the default policy (salf.defaults.DEFAULT_POLICY), resolved when a sweep is configured.
DEFAULT_ALIAS = "salf"
DEFAULT_SELECTORS = (DEFAULT_ALIAS, "max-gain", "paper", "onset", "freeze-half")   # --selectors
PREFIX_SELECTORS = tuple(BASELINE_SELECTORS.names(kind="prefix", sweep=True))
SET_SELECTORS = tuple(BASELINE_SELECTORS.names(kind="set", sweep=True))

# Dynamic freezing: "dyn-<policy>" (salf.dynamic POLICIES), optionally with settings
# "dyn-salf:tau=0.2:epsilon=0.1"; every dynamic cell starts from the default policy's cut.
DYNAMIC_PREFIX = "dyn-"
# what sweep folders before salf.sweep.folder.FOLDER_VERSION 2 named max-gain and max-gain-e0
OLD_SELECTOR_NAMES = {"salf": "max-gain", "salf-e0": "max-gain-e0"}


def is_salf_policy(name: str) -> bool:
    return name in CUT_POLICIES


def selector_dynamic_settings(name: str) -> dict | None:
    """The DynamicSettings (as a dict) a "dyn-<policy>[:key=value...]" selector runs (keys:
    DynamicSettings fields); None for a static selector. SalfError for an unknown policy or
    setting."""
    if not name.startswith(DYNAMIC_PREFIX):
        return None
    from ..dynamic import DynamicSettings

    policy, *params = name[len(DYNAMIC_PREFIX):].split(":")
    kwargs: dict = {}
    for item in filter(None, params):
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value.strip()
    try:
        return DynamicSettings.from_dict({"policy": policy, **kwargs}).to_dict()
    except (SalfError, TypeError) as exc:
        raise SalfError(f"sweep selector {name!r}: {exc}") from None


def resolve_selectors(names: list[str], default: str) -> list[str]:
    """The selectors a sweep runs, in order: `salf` becomes the default policy `default`,
    repeats are dropped, unknown names are refused."""
    known = [*CUT_POLICIES.labels(), *BASELINE_SELECTORS.labels(sweep=True)]
    resolved: list[str] = []
    for name in names:
        name = default if name == DEFAULT_ALIAS else name
        if name in OLD_SELECTOR_NAMES:
            raise SalfError(f"sweep selector {name!r} is now {OLD_SELECTOR_NAMES[name]!r} "
                            f"(selectors are named after their policies; {DEFAULT_ALIAS!r} "
                            f"is the default policy, {default})")
        if is_salf_policy(name):  # read as `salf plan --policy` reads it (budget=B's B too)
            from ..analysis.gains import parse_policy

            try:
                parse_policy(name)
            except SalfError as exc:
                raise SalfError(f"sweep selector {name!r}: {exc}") from None
        if not (is_salf_policy(name) or name in PREFIX_SELECTORS or name in SET_SELECTORS
                or selector_dynamic_settings(name) is not None):
            raise SalfError(f"unknown selector {name!r} for sweep; choose from {DEFAULT_ALIAS} "
                            f"(the default policy, {default}), {', '.join(known)}, "
                            f"{DYNAMIC_PREFIX}<policy>")
        if name not in resolved:
            resolved.append(name)
    return resolved


def parse_selectors(text: str) -> list[str]:
    """The sweep's --selectors: the names listed, or [] for 'none' (full fine-tuning and the
    --cuts cells only). An empty list is refused, as --cuts refuses one: it is more often a
    script's unset variable than a choice."""
    if text.strip().lower() == "none":
        return []
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise SalfError("--selectors names no selector; give 'none' for full fine-tuning and "
                        "the --cuts cells only")
    return names


def check_sweep_arguments(args) -> None:
    """The sweep's own checks of `salf sweep` arguments, before any model loads (from
    salf.checks.check_sweep): no launcher, --seeds in set_seed's range, every --selectors name
    known and its settings valid (budget=B, dyn-POLICY:key=value)."""
    from ..checks import parse_int_list
    from ..config import MAX_SEED

    if launched():  # every rank would run the whole sweep, and its cells join no group
        raise SalfError("salf sweep runs its own cells, one process each: run `salf sweep "
                        "--jobs N` without torchrun or accelerate launch (this process has "
                        "a launcher's RANK/LOCAL_RANK/WORLD_SIZE)")
    bad = [s for s in parse_int_list(args.seeds, "--seeds") if not 0 <= s <= MAX_SEED]
    if bad:
        raise SalfError(f"--seeds must be integers from 0 to {MAX_SEED} (2**32 - 1, what "
                        f"transformers.set_seed accepts), got {bad[0]}")
    resolve_selectors(parse_selectors(args.selectors), DEFAULT_POLICY)


@dataclass
class SweepConfig:
    """One sweep folder's settings (OUT/config.json). The fields with a flag in their metadata
    (salf.config.option) are `salf sweep`'s options, generated from it (`dest`: the option's
    name in the parsed arguments; `cli_default`: the CLI's text default of a list field)."""

    model: str
    dataset: str
    out: str
    cuts: list[int] | None = option(    # None = every cut 0..L-1
        None, "'all', comma-separated eof values, or 'none' (only full fine-tuning and the "
        "selectors' picks) (default %(default)s)", cli_default="all")
    selectors: list[str] = field(
        default_factory=lambda: list(DEFAULT_SELECTORS), metadata=MappingProxyType({
            "flag": "", "cli_default": ",".join(DEFAULT_SELECTORS),
            "help": "comma-separated selectors (see docs/selectors.md), or 'none' (full "
                    "fine-tuning and the --cuts cells only; with --cuts none, full fine-tuning "
                    "only) (default %(default)s)"}))
    default_selector: str = DEFAULT_POLICY   # what `salf` meant when the folder was last run
    seeds: list[int] = field(default_factory=lambda: [1], metadata=MappingProxyType({
        "flag": "", "cli_default": "1", "help": "comma-separated seeds (default %(default)s)"}))
    steps: int = option(120, "optimizer steps per cell (default %(default)s)", flag="--budget-steps",
                        dest="budget_steps", metavar="N")
    batch_size: int = option(16, "per-device batch of every cell (default %(default)s)")
    max_length: int = option(96, "tokens per example (default %(default)s)")
    lr: float = option(5e-5, "learning rate of every cell (default %(default)s)")
    test_samples: int = option(1000, "test rows each cell is evaluated on (default %(default)s)",
                               metavar="N")
    samples: int = option(256, "analysis examples for SALF's picks (default %(default)s)",
                          metavar="N")
    head: str = option("frozen", "output head of every cut cell (default %(default)s)",
                       cli_choices=CLI_HEADS)
    data_kwargs: dict = field(default_factory=dict)
    timeout_s: int | None = option(       # per cell; None: no limit
        None, "stop the sweep when one cell trains longer than this (default: no limit); with "
        "--save-steps a rerun continues that cell", flag="--cell-timeout", dest="cell_timeout",
        metavar="SECONDS")
    save_steps: int | None = option(      # a rerun resumes an unfinished cell from it
        None, "every cell saves a checkpoint every N steps (in OUT/cells/.work-CELL/, the last "
        "one kept); a rerun of the sweep resumes an unfinished cell from it, with the result of "
        "an uninterrupted run. Default: none (a cell stopped early starts again); worth it for "
        "cells of an hour or more", metavar="N")
    jobs: int = option(                   # cells run at once (not a training setting)
        1, "cells trained at once, each in its own process (default %(default)s). On a GPU a "
        "small model leaves the card mostly idle: several cells share it; with several GPUs, "
        "cells are spread over them. On a CPU the cores are split between the cells, which "
        "rarely beats 1", metavar="N")

    @classmethod
    def cli_fields(cls) -> list:
        """The fields `salf sweep` offers as options, in order."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("flag") is not None]

    def __post_init__(self):
        self.selectors = resolve_selectors(self.selectors, self.default_selector)

    def training_key(self) -> dict:
        """Settings every cell must share; a resumed sweep with other settings is refused."""
        return {k: getattr(self, k) for k in ("model", "dataset", "steps", "batch_size",
                                              "max_length", "lr", "test_samples", "head",
                                              "data_kwargs")}
