"""Loss change allocation: how much of a training step's loss decrease each layer's update makes.

To first order a step changes the loss by g·Δθ, summed over every trainable tensor; grouping
the sum by decoder layer says which layers the run is still learning through (Lan et al.,
"LCA: Loss Change Allocation for Neural Network Training", NeurIPS 2019, allocate along the
path the same way). salf-budget with `--share-from updates` reads a move's share of the
improvement ahead from it instead of the probe: freezing layers (k, k'] gives up what their
updates would have contributed.

The allocation is read before the optimizer steps, from the gradient of this step's batch
and the update direction the optimizer's state held before this batch (AdamW: lr·m̂/(√v̂+ε)
from the previous moments): the batch has not shaped that direction, so g·u estimates what
the direction does to the loss of rows the update has not seen — in a first epoch, the
held-out loss — rather than how well the step fits its own batch. SGD with momentum reads its
momentum buffer the same way, plain SGD counts lr·|g|²; an AdamW tensor before its first step
(no moments yet) counts nothing. Costs one elementwise pass over the trainable tensors per
step, far below the step's backward. A step where no layer's tensor had both a gradient and
a direction (AdamW's first step; an optimizer holding copies of the model's tensors, as
DeepSpeed ZeRO and FSDP's flat parameters do — a moving cut refuses those engines anyway)
reads None, not zeros: the policy must not take "no measurement" for "nothing left".
"""

from __future__ import annotations

import torch


def allocation(layers, optimizer) -> list[float] | None:
    """Per decoder layer, then one entry for every other trainable tensor: lr × g·u, the
    first-order loss decrease the coming update makes along the optimizer's current direction
    (positive: it lowers the loss). Tensors without a gradient (frozen) count nothing; None
    when no layer's tensor could be read (see above)."""
    in_layer = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    sums = [0.0] * (len(layers) + 1)
    state = getattr(optimizer, "state", {})
    measured = False
    with torch.no_grad():
        for group in optimizer.param_groups:
            lr = float(group.get("lr", 0.0))
            for p in group["params"]:
                if p.grad is None:
                    continue
                value = _along_direction(p.grad, state.get(p, {}), group)
                if value is None:
                    continue
                index = in_layer.get(id(p), len(layers))
                measured = measured or index < len(layers)
                sums[index] += lr * value
    return sums if measured else None


def _along_direction(grad: torch.Tensor, state: dict, group: dict) -> float | None:
    """g·u for one tensor: u = m̂/(√v̂ + ε) from AdamW's moments before this step, SGD's
    momentum buffer, or g itself for plain SGD; None for AdamW before its first step."""
    g = grad.detach().float()
    m, v, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
    if m is None or v is None or step is None or float(step) < 1:
        if "betas" in group:                 # Adam-like before its first step: no direction yet
            return None
        buffer = state.get("momentum_buffer")
        return float((g * (g if buffer is None else buffer.detach().float())).sum())
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    t = float(step)
    m_hat = m.detach().float() / (1.0 - beta1 ** t)
    v_hat = v.detach().float() / (1.0 - beta2 ** t)
    return float((g * m_hat / (v_hat.sqrt() + float(group.get("eps", 1e-8)))).sum())


DRIFT_LAG = 0.1      # the drift is each layer's displacement over this share of the run


class Drift:
    """The lagged allocation (`--ahead-from drift`): how much a layer's recent *drift* still
    lowers the loss. A training step's own first-order term (allocation() above) mostly
    measures the step's oscillation across the loss valley — on rotten-tomatoes at 360 steps
    every layer's summed allocation over the first 27 steps was negative while held-out
    accuracy went on improving (bench/RESULTS.md §4.14) — so instead the displacement
    D_l = θ_l(b) − θ_l(a) over the last completed lag period of `period` steps, where the
    oscillation has averaged out and the drift remains, is held fixed while later steps' fresh
    batch gradients g are read along it: −g·D_l > 0 says continuing the layer's drift still
    lowers the loss of rows the update has not seen (in a first epoch, held-out rows).

    Each step counts −g·D_l × (the step's clock increment) / (the clock D_l took), so summed
    over a window and divided by its clock it is the loss decrease per unit of the clock the
    layer's drift would keep making at its recent speed. Snapshots of the trainable decoder
    layers' tensors are taken at every multiple of `period` from `period` on — not at step 0:
    the first tenth of a classification run learns the label format (rotten-tomatoes' loss
    6.1 → 0.4), a drift the later gradients no longer have any use for, and θ_P − θ_0 read
    ~0 for every layer on rotten-tomatoes at 360 steps while its loss still fell (a1f8812,
    bench/RESULTS.md §4.15). Two copies of the trainable layers at most; they are tensor
    state, carried by a checkpoint, so a resumed run reads what the uninterrupted one would."""

    def __init__(self, period: int):
        self.period = max(1, int(period))
        self.newer: dict[str, torch.Tensor] = {}   # θ at the last snapshot
        self.drift: dict[str, torch.Tensor] = {}   # D = θ(b) − θ(a), the last two snapshots'
        self.steps: list[int] = []                 # the steps of [a, b] (JSON state)

    def observe(self, step: int, layers, clock) -> list[float] | None:
        """At the start of optimizer step `step` (the model holds θ_step, the gradients are
        this batch's): take a snapshot on a period boundary, then return per decoder layer,
        plus one entry (always 0) for every other tensor, −g·D_l scaled to this step's share
        of the clock; None until two snapshots exist. `clock(s)`: the clock after s steps."""
        if step >= self.period and step % self.period == 0 and (not self.steps or self.steps[-1] < step):
            now = _trainable_copy(layers)
            self.drift = {k: t - self.newer[k] for k, t in now.items() if k in self.newer}
            self.newer, self.steps = now, [*self.steps[-1:], step]
        if len(self.steps) < 2:
            return None
        spent = clock(self.steps[1]) - clock(self.steps[0])
        if spent <= 0:
            return None
        scale = (clock(step + 1) - clock(step)) / spent
        sums = [0.0] * (len(layers) + 1)
        measured = False
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for name, p in layer.named_parameters():
                    drift = self.drift.get(f"{i}.{name}")
                    if p.grad is None or drift is None:
                        continue
                    sums[i] -= float((p.grad.detach().float() * drift).sum()) * scale
                    measured = True
        return sums if measured else None

    def state_dict(self) -> dict:
        return {"steps": list(self.steps)}

    def tensor_state_dict(self) -> dict:
        return {**{f"newer.{k}": t for k, t in self.newer.items()},
                **{f"drift.{k}": t for k, t in self.drift.items()}}

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        self.steps = [int(s) for s in state.get("steps", [])]
        self.newer = {k[len("newer."):]: t.float() for k, t in tensors.items() if k.startswith("newer.")}
        self.drift = {k[len("drift."):]: t.float() for k, t in tensors.items() if k.startswith("drift.")}
        # a checkpoint without its tensors: start over from the next period's snapshot
        if not self.newer:
            self.steps, self.drift = [], {}
        elif len(self.steps) == 2 and not self.drift:
            self.steps = self.steps[-1:]


def _trainable_copy(layers) -> dict[str, torch.Tensor]:
    """The trainable tensors of the decoder layers, copied (float32)."""
    return {f"{i}.{name}": p.detach().float().clone()
            for i, layer in enumerate(layers) for name, p in layer.named_parameters() if p.requires_grad}
