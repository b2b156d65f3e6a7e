"""Block Influence (ShortGPT, Men et al. 2024): how much a decoder layer changes the
hidden state that passes through it.

    BI_l = 1 - E_{x, t}[ cos(h_in_{l,t}, h_out_{l,t}) ]

over every non-pad token position t (attention_mask == 1) of every example x,
from forward passes of the pretrained model over the given batches; h_in is the
layer's input, h_out its raw output (no final norm). A layer with BI ~ 0 is
close to the identity; ShortGPT removes the lowest-BI layers, so a high BI
marks an important layer.

Two selectors:
- `block-influence`: train the `budget_layers` layers with the highest BI (a set);
- `block-influence-cut`: the prefix cut eof = the largest k such that layers
  k+1..L still hold at least `mass` (default 0.8) of the total BI.
"""

from __future__ import annotations

import torch

from ..errors import SalfError
from ..models.anatomy import layer_output
from .base import (Selection, SelectorContext, cut_phrase, forward_kwargs, human_layers, model_device,
                   prefix_selection, set_selection, to_device, top_layers)


@torch.no_grad()
def block_influence(ctx: SelectorContext, max_batches: int | None = 32) -> tuple[list[float], int]:
    """BI per decoder layer (0-based list) and the number of tokens averaged over."""
    model, layers = ctx.model, ctx.anat.layers
    L = len(layers)
    sums = torch.zeros(L, dtype=torch.float64)
    state: dict = {}
    tokens = 0

    def pre_hook(index):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            if h is None:
                raise SalfError(f"block-influence: cannot find the input of decoder layer {index + 1}")
            state[index] = h
        return hook

    def post_hook(index):
        def hook(_module, _args, output):
            h_in = state.pop(index)
            h_out = layer_output(output)
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-8)
            sums[index] += (cos * state["mask"]).sum().double().cpu()
        return hook

    handles = []
    was_training = model.training
    device = model_device(model)
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook(i)))
        model.eval()
        for batch in ctx.iter_batches(max_batches, "block-influence"):
            batch = to_device(batch, device)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            state["mask"] = mask.to(torch.float32)
            model(**forward_kwargs(model, batch, last_only=True))
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise SalfError("block-influence: the batches contain no non-pad tokens")
    return [float(1.0 - s / tokens) for s in sums], tokens


def select_block_influence(ctx: SelectorContext, max_batches: int | None = 32) -> Selection:
    """Train the `budget_layers` layers with the highest Block Influence."""
    L, b = ctx.num_layers, ctx.budget
    bi, tokens = block_influence(ctx, max_batches)
    chosen = top_layers(bi, b)
    return set_selection(
        "block-influence", ctx, chosen,
        f"block influence (ShortGPT, Men et al. 2024): top {b}/{L} layers by BI over "
        f"{tokens} tokens: train {human_layers(chosen)}",
        scores=bi, params={"budget_layers": b, "max_batches": max_batches, "tokens": tokens,
                           "embeddings_trainable": False})


def suffix_mass_cut(values: list[float], mass: float) -> int:
    """Largest k in 0..L-1 with sum(values[k:]) >= mass * sum(values) (0 if the total is 0)."""
    total = sum(values)
    if total <= 0:
        return 0
    suffix = 0.0
    for k in range(len(values) - 1, -1, -1):
        suffix += values[k]
        if suffix >= mass * total * (1 - 1e-12):
            return k
    return 0


def select_block_influence_cut(ctx: SelectorContext, mass: float = 0.8,
                               max_batches: int | None = 32) -> Selection:
    """Prefix cut: freeze as many bottom layers as possible while layers k+1..L keep
    at least `mass` of the total Block Influence."""
    if not 0.0 < mass <= 1.0:
        raise SalfError(f"block-influence-cut: mass must be in (0, 1], got {mass!r}")
    L = ctx.num_layers
    bi, tokens = block_influence(ctx, max_batches)
    clipped = [max(0.0, v) for v in bi]  # float noise can make an identity layer's BI -1e-8
    k = suffix_mass_cut(clipped, mass)
    share = sum(clipped[k:]) / sum(clipped) if sum(clipped) > 0 else 1.0
    return prefix_selection(
        "block-influence-cut", ctx, k,
        f"block influence cut (ShortGPT BI, Men et al. 2024): layers {k + 1}..{L} hold "
        f"{share:.0%} of the BI mass (>= {mass:.0%}): {cut_phrase(k, L)}",
        scores=bi, params={"mass": mass, "suffix_share": share, "max_batches": max_batches,
                           "tokens": tokens, "embeddings_trainable": False})
