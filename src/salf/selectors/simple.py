"""Rule-of-thumb selectors that look at nothing but the layer count."""

from __future__ import annotations

import random as _random

from ..errors import SalfError
from .base import (Selection, SelectorContext, cut_phrase, human_layers, prefix_selection,
                   set_selection)


def select_full(ctx: SelectorContext) -> Selection:
    """Full fine-tuning: every decoder layer and the embeddings train."""
    L = ctx.num_layers
    return Selection(
        name="full", eof=None, trainable_layers=list(range(L)), scores=None, lora=False,
        reason=f"full fine-tuning: all {L} decoder layers and the embeddings train",
        params={"embeddings_trainable": True}, eof_equivalent=0, num_layers=L)


def select_lora(ctx: SelectorContext) -> Selection:
    """LoRA adapters on every decoder layer; base weights and embeddings frozen (cut 0)."""
    L = ctx.num_layers
    return prefix_selection(
        "lora", ctx, 0, f"LoRA on all {L} decoder layers, base weights frozen", lora=True,
        params={"embeddings_trainable": False})


def select_freeze_half(ctx: SelectorContext) -> Selection:
    """Freeze the bottom half: eof = L // 2."""
    L = ctx.num_layers
    k = L // 2
    return prefix_selection("freeze-half", ctx, k,
                            f"freeze half (L // 2 of {L}): {cut_phrase(k, L)}",
                            params={"embeddings_trainable": False})


def select_freeze_first_k(ctx: SelectorContext, k: int | None = None) -> Selection:
    """Freeze embeddings + layers 1..k (k in 0..L-1)."""
    L = ctx.num_layers
    if k is None:
        raise SalfError("selector 'freeze-first-k' needs k (how many decoder layers to freeze)")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= L - 1:
        raise SalfError(f"freeze-first-k: k must be an integer in 0..{L - 1}, got {k!r}")
    return prefix_selection("freeze-first-k", ctx, k,
                            f"freeze first k={k} of {L}: {cut_phrase(k, L)}",
                            params={"k": k, "embeddings_trainable": False})


def select_random(ctx: SelectorContext, mode: str = "prefix", seed: int | None = None) -> Selection:
    """A seeded random choice.

    mode="prefix" (default, the fair comparison with SALF): eof uniform in 1..L-1
    (0 when L == 1). mode="set": `budget_layers` distinct layers uniformly at random.
    The RNG is `random.Random(seed)` (context seed unless given), independent of torch.
    """
    L = ctx.num_layers
    seed = ctx.seed if seed is None else seed
    rng = _random.Random(seed)
    if mode == "prefix":
        k = rng.randint(1, L - 1) if L >= 2 else 0
        return prefix_selection("random", ctx, k,
                                f"random cut (seed {seed}): {cut_phrase(k, L)}",
                                params={"mode": mode, "seed": seed, "embeddings_trainable": False})
    if mode == "set":
        b = ctx.budget
        layers = rng.sample(range(L), b)
        return set_selection("random", ctx, layers,
                             f"random set of {b} layers (seed {seed}): train {human_layers(layers)}",
                             params={"mode": mode, "seed": seed, "budget_layers": b,
                                     "embeddings_trainable": False})
    raise SalfError(f"random: mode must be 'prefix' or 'set', got {mode!r}")
