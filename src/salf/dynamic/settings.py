"""The settings of a dynamic run (import-light: `salf --help` reads them)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..choices import DYNAMIC_POLICIES
from ..config import flag_of, option
from ..errors import SalfError

POLICIES = tuple(DYNAMIC_POLICIES.names())     # salf.choices: each policy's function and needs
CLOCKS = ("lr-area", "steps")
PLASTICITY = ("shift", "deviation")
ACCOUNTING = ("fixed", "hindsight")
SHARE_SOURCES = ("probe", "updates")
AHEAD_SOURCES = ("loss", "updates", "drift")
# settings added after cells were published, with the value those cells ran with
LATER = {"max_move": 0.0, "accounting": "fixed", "share_from": "probe", "ahead_from": "loss"}
# the settings only salf-budget reads: a record made before they existed (the first
# controller's published cells) ran every other policy exactly as it runs now
BUDGET_ONLY = ("tolerance", "min_saving", "probe_budget", "law_checks", "guard", "max_move",
               "accounting", "share_from", "ahead_from")
# what each policy needs measured at a check
NEEDS = {c.name: set(c.needs) for c in DYNAMIC_POLICIES}


@dataclass
class DynamicSettings:
    """How a dynamic run decides. Every field is a flag of `salf train/finetune --dynamic`
    (and a `dyn-POLICY:field=value` setting of `salf sweep`); its metadata holds the flag and
    the help text the CLI shows (salf.config.option), so the two cannot drift. The policies
    and why: docs/method.md, "Dynamic freezing" and "The budget-aware controller"."""

    policy: str = option("salf", "start from the plan's cut and move it deeper when POLICY "
                         "says so", flag="--dynamic", metavar="POLICY", choices=POLICIES)
    tau: float = option(0.2, "salf: a space above the cut counts as settled when its deviation "
                        "moved at most TAU x the output space's over the last interval",
                        flag="--plasticity-share", metavar="TAU")
    plasticity: str = option("shift", "salf: how a space's move is measured: shift (each probe "
                             "target's own move toward or away from its semantics) or deviation "
                             "(the move of their mean D_l)", flag="--plasticity-measure",
                             choices=PLASTICITY)
    epsilon: float = option(0.2, "salf: the run is past its knee when the step law's predicted "
                            "remaining improvement is at most EPS x the improvement so far",
                            flag="--remaining-share", metavar="EPS")
    clock: str = option("lr-area", "salf: the step law's time axis (lr-area: the sum of learning "
                        "rates so far)", flag="--law-clock", choices=CLOCKS)
    checks: int = option(10, "checks per run, evenly spaced", metavar="N")
    probe_rows: int = option(16, "held-out rows the salf and static policies read at every "
                             "check, from the validation split", metavar="N")
    min_points: int = option(3, "salf: probe checks after step 0 before the law is fitted",
                             flag="--law-points", metavar="N")
    max_eof: int | None = option(None, "the deepest cut any policy may reach (default: L-1, one "
                                 "layer trains)", flag="--deepest-cut", metavar="K")
    start: float | None = option(None, "linear: fraction of the run before the first freeze "
                                 "(default 0.5); freezeout: t0 of the cubic schedule (default 0.8)",
                                 flag="--freeze-start", metavar="F")
    percentile: float = option(50.0, "autofreeze: the gradient-norm change-rate percentile a "
                               "layer must reach to keep training", flag="--rate-percentile",
                               metavar="P")
    tolerance: float = option(0.05, "salf-budget: the moves may give up at most F x the training "
                              "loss's level", flag="--loss-tolerance", metavar="F")
    min_saving: float = option(0.01, "salf-budget: a move must save at least F of the run's full "
                               "fine-tuning FLOPs over the steps left", metavar="F")
    probe_budget: float = option(0.01, "salf-budget: the probe's reads stay within F of the "
                                 "run's FLOPs", metavar="F")
    law_checks: int = option(40, "salf-budget: checks per run; each reads the training loss "
                             "(free), the probe only where a move could be allowed", metavar="N")
    guard: bool = option(True, "salf-budget: undo a move when the training loss over the steps "
                         "since it rose beyond the noise from as many steps before it",
                         flag="--undo-guard")
    max_move: float = option(0.0, "salf-budget: a move freezes at most F of the model's layers "
                             "(rounded up; 0: no bound)", metavar="F")
    accounting: str = option("fixed", "salf-budget: what a move is charged against the loss "
                             "budget: fixed (its upper-bound cost when made) or hindsight "
                             "(re-read at every check: the improvement made since the move plus "
                             "what is still ahead, times its share)", flag="--budget-accounting",
                             choices=ACCOUNTING)
    share_from: str = option("probe", "salf-budget: what a layer's share of the improvement ahead "
                             "is read from: probe (how far its space moved relative to the output "
                             "space, a forward pass per read) or updates (its share of the training "
                             "steps' first-order loss decrease, gradient x the optimizer's update "
                             "direction: free, no probe)", choices=SHARE_SOURCES)
    ahead_from: str = option("loss", "salf-budget: what the layers a move freezes would still "
                             "gain: loss (their share x the improvement the training loss's rate "
                             "puts ahead) or updates (their own loss decrease per unit of the "
                             "clock over the recent steps, + 1 SE, x the clock left; needs "
                             "--share-from updates) or drift (the same, from the fresh gradient "
                             "along each layer's displacement over the last tenth of the run: "
                             "free, no probe; two copies of the trainable layers)",
                             choices=AHEAD_SOURCES)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "DynamicSettings":
        DYNAMIC_POLICIES.get(self.policy)    # unknown: one SalfError listing the policies
        if self.plasticity not in PLASTICITY:
            raise SalfError(f"{_named('plasticity')} must be one of {', '.join(PLASTICITY)}, "
                            f"got {self.plasticity!r}")
        if self.share_from not in SHARE_SOURCES:
            raise SalfError(f"{_named('share_from')} must be one of {', '.join(SHARE_SOURCES)}, "
                            f"got {self.share_from!r}")
        if self.ahead_from not in AHEAD_SOURCES:
            raise SalfError(f"{_named('ahead_from')} must be one of {', '.join(AHEAD_SOURCES)}, "
                            f"got {self.ahead_from!r}")
        if self.ahead_from == "updates" and self.share_from != "updates":
            raise SalfError(f"{_named('ahead_from')} updates reads each layer's own loss decrease: "
                            f"it needs {FLAGS['share_from']} updates")
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
        """What a check measures for this policy (salf.choices); salf-budget reading its shares
        from the updates needs the per-layer loss allocation instead of the probe, and reading
        what is ahead from the drift needs the drift's readings alone (no share is read)."""
        needs = set(DYNAMIC_POLICIES.get(self.policy)[0].needs)
        if self.policy == "salf-budget" and self.ahead_from == "drift":
            return (needs - {"probe", "probe_on_demand"}) | {"drift"}
        if self.policy == "salf-budget" and self.share_from == "updates":
            needs = (needs - {"probe", "probe_on_demand"}) | {"update_shares"}
        return needs

    def to_dict(self) -> dict:
        """The settings as recorded (run.json, sweep cells); a setting added after runs were
        published is left out while it keeps the value those runs had, so their records —
        and a resume of their checkpoints — still match."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in LATER or v != LATER[k]}

    @classmethod
    def meaning(cls, record: dict | None) -> dict | None:
        """What a recorded settings dict means today, for comparing two records (a sweep cell
        against the selector asked for): a setting it lacks takes its default, and a policy
        other than salf-budget leaves out the settings only salf-budget reads."""
        if record is None:
            return None
        meant = cls.from_dict(record).to_dict()
        if meant["policy"] != "salf-budget":
            meant = {k: v for k, v in meant.items() if k not in BUDGET_ONLY}
        return meant

    @classmethod
    def from_dict(cls, d: dict) -> "DynamicSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SalfError(f"unknown dynamic setting(s): {', '.join(unknown)}")
        return cls(**d)


# the `salf train/finetune` flag of each setting
FLAGS = {f.name: flag_of(f.name, f.metadata) for f in dataclasses.fields(DynamicSettings)}


def _named(setting: str) -> str:
    return f"dynamic {setting} ({FLAGS[setting]})"
