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
