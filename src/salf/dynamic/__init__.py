"""Dynamic freezing: the cut moves deeper while training, read from the model being trained.

    settings = DynamicSettings(policy="salf")           # or autofreeze, linear, freezeout, static
    probe = Probe(batches, "classification", label_token_ids)
    callback = DynamicFreezeCallback(settings, probe)    # add to any Trainer of a planned model

`salf train --dynamic` / `salf finetune --dynamic` wire it up; `schedule_cost` integrates the
cost model over the schedule. See docs/method.md, "Dynamic freezing".
"""

from .callback import LOG_FILE, STATE_FILE, DynamicFreezeCallback, check_steps
from .cost import cut_per_step, probe_forward_flops, schedule_cost
from .policies import CLOCKS, POLICIES, Check, Decision, DynamicSettings, RunShape, decide
from .probe import Probe, probe_rows

__all__ = [
    "DynamicFreezeCallback", "DynamicSettings", "Probe", "probe_rows", "Check", "Decision", "RunShape",
    "decide", "check_steps", "schedule_cost", "cut_per_step", "probe_forward_flops",
    "POLICIES", "CLOCKS", "STATE_FILE", "LOG_FILE",
]
