"""Gradient-norm cut, in the spirit of AutoFreeze (Liu et al. 2021).

AutoFreeze watches, during training, how fast each layer's gradient norm changes
and freezes the front layers that have stopped changing. Before training there
is no history, so this baseline uses the one-shot static form of the same idea:
layers whose gradients are small barely move, so freeze them.

    g_l   = mean over n batches of || grad_{W_l} loss ||_2
            (the L2 norm of all of layer l's parameter gradients together)
    m_l   = g_l / sum_j g_j                       (gradient mass)
    eof   = largest k in 0..L-1 with  m_1 + ... + m_k < `mass` (default 0.2)

The loss is the fine-tuning loss (`base.training_loss`): classification -> CE of
the last-position logits vs target_ids; SFT -> the model's loss with labels.
Gradients go only to parameters that already require grad, via autograd.grad,
so `.grad` and the requires_grad flags are untouched; a layer the caller froze
gets zero mass.
"""

from __future__ import annotations

import torch

from ..errors import SalfError
from .base import (Selection, SelectorContext, cut_phrase, model_device, prefix_selection, to_device,
                   training_loss)


def layer_grad_norms(ctx: SelectorContext, n_batches: int = 8) -> tuple[list[float], int]:
    """Mean over batches of each decoder layer's gradient L2 norm, and the batch count."""
    model, layers = ctx.model, ctx.anat.layers
    L = len(layers)
    owners: list[int] = []
    params: list[torch.nn.Parameter] = []
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            if p.requires_grad:
                owners.append(i)
                params.append(p)
    if not params:
        raise SalfError("grad-norm: no decoder-layer parameter requires grad (the whole stack is frozen)")
    if n_batches is None or n_batches < 1:
        raise SalfError(f"grad-norm: n_batches must be >= 1, got {n_batches!r}")
    totals = torch.zeros(L, dtype=torch.float64)
    count = 0
    was_training = model.training
    device = model_device(model)
    try:
        model.eval()  # deterministic: no dropout
        for batch in ctx.iter_batches(n_batches, "grad-norm"):
            batch = to_device(batch, device)
            with torch.enable_grad():
                loss = training_loss(model, batch)
                if not loss.requires_grad:
                    raise SalfError("grad-norm: the loss does not depend on any trainable layer")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            sq = torch.zeros(L, dtype=torch.float64)
            for i, g in zip(owners, grads):
                if g is not None:
                    sq[i] += float(g.detach().double().pow(2).sum())
            totals += sq.sqrt()
            count += 1
    finally:
        model.train(was_training)
    return [float(v / count) for v in totals], count


def prefix_mass_cut(values: list[float], mass: float) -> int:
    """Largest k in 0..L-1 with sum(values[:k]) < mass * sum(values)."""
    total = sum(values)
    if total <= 0:
        return 0
    k, prefix = 0, 0.0
    for j in range(1, len(values)):  # j = candidate cut, prefix = layers 1..j
        prefix += values[j - 1]
        if prefix < mass * total:
            k = j
        else:
            break
    return k


def select_grad_norm(ctx: SelectorContext, n_batches: int = 8, mass: float = 0.2) -> Selection:
    """Freeze the longest bottom prefix that holds less than `mass` of the gradient norm."""
    if not 0.0 < mass <= 1.0:
        raise SalfError(f"grad-norm: mass must be in (0, 1], got {mass!r}")
    L = ctx.num_layers
    norms, used = layer_grad_norms(ctx, n_batches)
    total = sum(norms)
    shares = [v / total for v in norms] if total > 0 else [0.0] * L
    k = prefix_mass_cut(norms, mass)
    frozen_share = sum(shares[:k])
    return prefix_selection(
        "grad-norm", ctx, k,
        f"gradient norm (AutoFreeze-style, Liu et al. 2021): the bottom {k} layers hold "
        f"{frozen_share:.0%} (< {mass:.0%}) of the gradient norm over {used} batches: "
        f"{cut_phrase(k, L)}",
        scores=shares,
        params={"n_batches": n_batches, "batches_used": used, "mass": mass,
                "grad_norms": norms, "frozen_share": frozen_share, "embeddings_trainable": False})
