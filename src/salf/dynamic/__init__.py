"""Dynamic freezing: the cut moves deeper while training, read from the model being trained.

    settings = DynamicSettings(policy="salf")           # or autofreeze, linear, freezeout, static
    probe = Probe.from_rows(task, tokenizer, held_out_rows, max_length=96)
    callback = DynamicFreezeCallback(settings, probe)    # add to any Trainer of a planned model
    callback = moving_cut(settings, task, tokenizer, rows, plan=plan)   # checked, for salf.train.train

`salf train --dynamic` / `salf finetune --dynamic` wire it up; `schedule_cost` integrates the
cost model over the schedule. See docs/method.md, "Dynamic freezing".

The settings import nothing heavy (the CLI reads them for --help); everything else is
imported on first use.
"""

from importlib import import_module

from .settings import CLOCKS, FLAGS, NEEDS, POLICIES, DynamicSettings

_LAZY = {
    "DynamicFreezeCallback": "callback", "check_steps": "callback", "LOG_FILE": "callback",
    "schedule_cost": "cost", "cut_per_step": "cost",
    "Check": "policies", "Decision": "policies",
    "RunShape": "policies", "decide": "policies", "Probe": "probe", "probe_rows": "probe",
    "moving_cut": "setup", "split_off_probe": "setup",
}

__all__ = ["DynamicSettings", "POLICIES", "CLOCKS", "FLAGS", "NEEDS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
