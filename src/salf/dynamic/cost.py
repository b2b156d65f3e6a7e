"""The cost of a run whose cut moves: the cost model per step at the cut in force, summed.

A schedule `[[step, eof], ...]` says that after optimizer step `step` (0 = before the first)
the cut is `eof`; steps step+1 .. (next entry) train with it. The run's training FLOPs are
the sum over its steps of `salf.cost`'s per-step FLOPs at that cut, plus the probes' forward
passes, relative to the same number of full fine-tuning steps — the quantity a static cut's
`flops_ratio` is, so dynamic and static runs sit on one axis (docs/method.md).
"""

from __future__ import annotations

from ..cost import StepSettings, cost_curve
from ..errors import SalfError


def cut_per_step(schedule: list[list[int]], total_steps: int) -> list[int]:
    """The cut in force during each optimizer step 1..total_steps (list index = step - 1)."""
    if not schedule or schedule[0][0] != 0:
        raise SalfError(f"a cut schedule starts at step 0, got {schedule!r}")
    cuts, entry = [], 0
    for step in range(1, total_steps + 1):
        while entry + 1 < len(schedule) and schedule[entry + 1][0] < step:
            entry += 1
        cuts.append(int(schedule[entry][1]))
    return cuts


def schedule_cost(shape, schedule: list[list[int]], total_steps: int, step: StepSettings | None = None, *,
                  probe_flops: float = 0.0, **settings) -> dict:
    """Integrated cost of a schedule, relative to full fine-tuning for as many steps.

    `step`: the settings of each step (`salf.cost.StepSettings`), or, as before, its
    fields as keywords (seq_len=, batch_size=, loss_positions=, head=, ...).
    `flops_ratio` counts every FLOP the cost model does (matmuls, optimizer, embedding
    gradient, cross-entropy) plus `probe_flops`; `matmul_flops` (absolute, probes included)
    is what torch's FlopCounterMode counts over the run.
    """
    curve = cost_curve(shape, StepSettings.of(step, **settings), include_full=True)
    full = curve[-1]
    cuts = cut_per_step(schedule, total_steps)
    train_flops = sum(curve[k]["flops_abs"] for k in cuts)
    train_matmul = sum(curve[k]["matmul_flops"] for k in cuts)
    steps_at: dict[int, int] = {}
    for k in cuts:
        steps_at[k] = steps_at.get(k, 0) + 1
    reference = total_steps * full["flops_abs"]
    return {
        "flops_ratio": (train_flops + probe_flops) / reference,
        "train_flops_ratio": train_flops / reference,
        "probe_flops_ratio": probe_flops / reference,
        "probe_share_of_run": probe_flops / (train_flops + probe_flops) if train_flops else 0.0,
        "matmul_flops": train_matmul + probe_flops,
        "memory_ratio_final": curve[cuts[-1]]["memory_ratio"] if cuts else None,
        "steps_at_eof": {str(k): n for k, n in sorted(steps_at.items())},
    }
