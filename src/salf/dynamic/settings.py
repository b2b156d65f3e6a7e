"""The settings of a dynamic run (import-light: `salf --help` reads them)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..choices import DYNAMIC_POLICIES
from ..errors import SalfError

POLICIES = tuple(DYNAMIC_POLICIES.names())     # salf.choices: each policy's function and needs
# the `salf train/finetune/sweep` flag of each setting (docs/method.md lists them all)
FLAGS = {"policy": "--dynamic", "tau": "--plasticity-share", "epsilon": "--remaining-share",
         "plasticity": "--plasticity-measure", "clock": "--law-clock", "checks": "--checks",
         "probe_rows": "--probe-rows",
         "min_points": "--law-points", "max_eof": "--deepest-cut", "start": "--freeze-start",
         "percentile": "--rate-percentile", "tolerance": "--loss-tolerance",
         "min_saving": "--min-saving", "probe_budget": "--probe-budget", "law_checks": "--law-checks",
         "guard": "--undo-guard", "max_move": "--max-move", "accounting": "--budget-accounting"}
CLOCKS = ("lr-area", "steps")
PLASTICITY = ("shift", "deviation")
ACCOUNTING = ("fixed", "hindsight")
# settings added after cells were published, with the value those cells ran with
LATER = {"max_move": 0.0, "accounting": "fixed"}
# what each policy needs measured at a check
NEEDS = {c.name: set(c.needs) for c in DYNAMIC_POLICIES}


@dataclass
class DynamicSettings:
    """How a dynamic run decides; every threshold is a flag of `salf train --dynamic`.

    tau       semantic plasticity: a space l above the cut counts as settled when it moved
              at most tau x as much as the output space over the last interval (docs/method.md,
              signal (a)).
    plasticity  how a space's move is measured: "shift", the mean over the probe's targets of
              |Δ cos(t_l, b_y)| (each target's own move toward or away from its semantics), or
              "deviation", |Δ D_l| (the move of their mean, where opposite moves cancel).
    epsilon   step scaling law: the run is past its knee when the law's predicted remaining
              improvement is at most epsilon x the improvement since the first check (b).
    clock     the law's time axis: "lr-area" (sum of learning rates so far, the schedule's
              own progress) or "steps".
    checks    checks per run (evenly spaced; a step-0 check adds the pretrained baseline
              where the policy probes).
    probe_rows  rows of the fixed probe set (held out of training).
    min_points  probe checks after step 0 needed before the law is fitted.
    max_eof   the deepest cut any policy may reach (None = L - 1: one layer keeps training).
    start     linear: fraction of the run before the first freeze; freezeout: t0.
    percentile  autofreeze: the rate percentile a layer must reach to keep training.
    tolerance   salf-budget: the moves may give up at most this fraction of the training
              loss's level (salf.dynamic.budget).
    min_saving  salf-budget: a move must save at least this fraction of the run's full
              fine-tuning FLOPs over the steps left.
    probe_budget  salf-budget: the probe's reads stay within this share of the run's FLOPs.
    law_checks  salf-budget: checks per run (the law reads the training loss, free; the probe
              is read only at checks where the budget could allow a move).
    guard     salf-budget: undo a move when the training loss since it rose beyond the noise
              from as many steps before it.
    max_move  salf-budget: a move freezes at most this share of the model's layers (rounded
              up; 0: no bound — the setting of the first published cells, commit 6436724).
    accounting  salf-budget: what a move is charged against the budget: "fixed", its
              upper-bound cost when it was made (ρ·R then); "hindsight", re-read at every
              check as ρ × (the improvement made since the move + R now).
    """

    policy: str = "salf"
    tau: float = 0.2
    plasticity: str = "shift"
    epsilon: float = 0.2
    clock: str = "lr-area"
    checks: int = 10
    probe_rows: int = 16
    min_points: int = 3
    max_eof: int | None = None
    start: float | None = None
    percentile: float = 50.0
    tolerance: float = 0.05
    min_saving: float = 0.01
    probe_budget: float = 0.01
    law_checks: int = 40
    guard: bool = True
    max_move: float = 0.0
    accounting: str = "fixed"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "DynamicSettings":
        DYNAMIC_POLICIES.get(self.policy)    # unknown: one SalfError listing the policies
        if self.plasticity not in PLASTICITY:
            raise SalfError(f"{_named('plasticity')} must be one of {', '.join(PLASTICITY)}, "
                            f"got {self.plasticity!r}")
        if self.accounting not in ACCOUNTING:
            raise SalfError(f"{_named('accounting')} must be one of {', '.join(ACCOUNTING)}, "
                            f"got {self.accounting!r}")
        if self.clock not in CLOCKS:
            raise SalfError(f"{_named('clock')} must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        for name, lo, hi in (("tau", 0.0, math.inf), ("epsilon", 0.0, math.inf),
                             ("percentile", 0.0, 100.0), ("tolerance", 0.0, 1.0),
                             ("min_saving", 0.0, 1.0), ("probe_budget", 0.0, 1.0),
                             ("max_move", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or not lo <= value <= hi:
                raise SalfError(f"{_named(name)} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        if not isinstance(self.guard, bool):
            raise SalfError(f"{_named('guard')} must be true or false, got {self.guard!r}")
        for name, lo in (("checks", 1), ("probe_rows", 1), ("min_points", 2), ("law_checks", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise SalfError(f"{_named(name)} must be an integer >= {lo}, got {value!r}")
        if self.start is not None and not 0.0 <= self.start < 1.0:
            raise SalfError(f"{_named('start')} must be a fraction in [0, 1), got {self.start!r}")
        if self.max_eof is not None and (not isinstance(self.max_eof, int) or self.max_eof < 0):
            raise SalfError(f"{_named('max_eof')} must be a non-negative integer, got {self.max_eof!r}")
        return self

    def deepest_cut(self, num_layers: int, start_eof: int) -> int:
        """The deepest cut this run may reach on a model of `num_layers` layers starting at
        `start_eof`; a max_eof outside [start_eof, num_layers - 1] is refused, not capped."""
        if self.max_eof is None:
            return num_layers - 1
        low, high = start_eof, num_layers - 1
        if not low <= self.max_eof <= high:
            raise SalfError(f"{_named('max_eof')} must be in [{low}, {high}] (from the starting cut "
                            f"{start_eof} to one below the model's {num_layers} layers), "
                            f"got {self.max_eof}")
        return self.max_eof

    @property
    def needs(self) -> set[str]:
        return set(DYNAMIC_POLICIES.get(self.policy)[0].needs)

    def to_dict(self) -> dict:
        """The settings as recorded (run.json, sweep cells); a setting added after runs were
        published is left out while it keeps the value those runs had, so their records —
        and a resume of their checkpoints — still match."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in LATER or v != LATER[k]}

    @classmethod
    def from_dict(cls, d: dict) -> "DynamicSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SalfError(f"unknown dynamic setting(s): {', '.join(unknown)}")
        return cls(**d)


def _named(setting: str) -> str:
    return f"dynamic {setting} ({FLAGS[setting]})"
