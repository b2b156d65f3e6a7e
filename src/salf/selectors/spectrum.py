"""Spectrum (Hartford et al. 2024): rank layers by the signal-to-noise ratio of their
weight matrices' singular values against a Marchenko-Pastur noise edge.

Per weight matrix W (n x m) with singular values s_1 >= ... >= s_r, as the
reference implementation (cognitivecomputations/spectrum) computes it:

    sigma  = IQR(s) / 1.349                 (robust noise scale of the spectrum)
    beta   = min(n, m) / max(n, m)
    eps    = sigma * (1 + sqrt(beta))       (the Marchenko-Pastur bulk edge)
    SNR    = sum(s_i > eps) / sum(s_i <= eps)
    score  = SNR / s_1                      (normalize="max", the reference code)

Weights only; no data. See docs/selectors.md for the choices made here.
"""

from __future__ import annotations

import math

import torch

from ..errors import SalfError
from .base import Selection, SelectorContext, human_layers, set_selection, top_layers

_NORMALIZE = ("max", "none")
_AGGREGATE = ("type-rank", "type-normalized", "mean")


def mp_threshold(sigma: float, n: int, m: int) -> float:
    """Marchenko-Pastur singular-value edge sigma * (1 + sqrt(min/max aspect ratio))."""
    beta = min(n, m) / max(n, m)
    return sigma * (1.0 + math.sqrt(beta))


def singular_value_snr(s: torch.Tensor, n: int, m: int, normalize: str = "max") -> float:
    """Spectrum's SNR from the singular values `s` of an n x m matrix."""
    if normalize not in _NORMALIZE:
        raise SalfError(f"spectrum: normalize must be one of {_NORMALIZE}, got {normalize!r}")
    s = torch.sort(s.detach().double().flatten(), descending=True).values
    top = float(s[0]) if s.numel() else 0.0
    if top <= 0.0:
        return 0.0  # zero matrix: no signal
    sigma = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    eps = mp_threshold(sigma, n, m)
    above = s > eps
    signal = float(s[above].sum())
    # No singular value inside the bulk (e.g. all equal, IQR 0): the reference code
    # then divides by 1 rather than 0.
    noise = float(s[~above].sum()) if bool((~above).any()) else 1.0
    snr = signal / noise if noise > 0 else 0.0
    return snr / top if normalize == "max" else snr


def matrix_snr(weight: torch.Tensor, normalize: str = "max") -> float:
    """SNR of one weight matrix (2-D), or the mean over the slices of a 3-D stack."""
    w = weight.detach()
    if w.ndim == 3:  # stacked experts (E, n, m): one matrix per expert
        return sum(matrix_snr(w[e], normalize) for e in range(w.shape[0])) / w.shape[0]
    if w.ndim != 2:
        raise SalfError(f"spectrum: expected a 2-D weight matrix, got shape {tuple(w.shape)}")
    s = torch.linalg.svdvals(w.float())
    n, m = w.shape
    return singular_value_snr(s, n, m, normalize)


def layer_matrix_snrs(layer: torch.nn.Module, normalize: str = "max") -> dict[str, float]:
    """SNR of every weight matrix of one decoder layer, keyed by its name inside the layer
    (the module type, e.g. "self_attn.q_proj.weight"). 1-D parameters (norms, biases) skipped."""
    return {name: matrix_snr(p, normalize) for name, p in layer.named_parameters()
            if p.ndim in (2, 3) and p.numel() > 0}


def _percentile_ranks(values: list[float]) -> list[float]:
    """Rank scaled to [0, 1] (1 = highest); ties share their average rank."""
    n = len(values)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 / (n - 1)
        i = j + 1
    return ranks


def aggregate_layer_scores(per_layer: list[dict[str, float]], aggregate: str) -> list[float]:
    """One score per layer from per-matrix SNRs.

    type-rank (default): per module type, rank the layers by SNR (percentile, 1 = best),
      then average a layer's ranks over its types — the layer-level analogue of Spectrum's
      per-type top-p% selection, and free of scale differences between types;
    type-normalized: per type, SNR / max over layers, averaged over the layer's types;
    mean: plain mean of the layer's raw SNRs.
    """
    if aggregate not in _AGGREGATE:
        raise SalfError(f"spectrum: aggregate must be one of {_AGGREGATE}, got {aggregate!r}")
    L = len(per_layer)
    if aggregate == "mean":
        return [sum(d.values()) / len(d) if d else 0.0 for d in per_layer]
    types = sorted({t for d in per_layer for t in d})
    contrib: list[list[float]] = [[] for _ in range(L)]
    for t in types:
        idx = [i for i in range(L) if t in per_layer[i]]
        vals = [per_layer[i][t] for i in idx]
        if aggregate == "type-rank":
            norm = _percentile_ranks(vals)
        else:
            top = max(vals)
            norm = [v / top if top > 0 else 0.0 for v in vals]
        for i, v in zip(idx, norm):
            contrib[i].append(v)
    return [sum(c) / len(c) if c else 0.0 for c in contrib]


def select_spectrum(ctx: SelectorContext, normalize: str = "max",
                    aggregate: str = "type-rank") -> Selection:
    """Train the `budget_layers` layers with the highest aggregated weight SNR."""
    L, b = ctx.num_layers, ctx.budget
    with torch.no_grad():
        per_layer = [layer_matrix_snrs(layer, normalize) for layer in ctx.anat.layers]
    if not any(per_layer):
        raise SalfError("spectrum: the decoder layers have no 2-D weight matrices")
    scores = aggregate_layer_scores(per_layer, aggregate)
    chosen = top_layers(scores, b)
    types = sorted({t for d in per_layer for t in d})
    snr_by_type = {t: [per_layer[i].get(t) for i in range(L)] for t in types}
    return set_selection(
        "spectrum", ctx, chosen,
        f"spectrum (Hartford et al. 2024): top {b}/{L} layers by weight SNR "
        f"({aggregate}, normalize={normalize}): train {human_layers(chosen)}",
        scores=scores,
        params={"budget_layers": b, "normalize": normalize, "aggregate": aggregate,
                "snr_by_type": snr_by_type, "embeddings_trainable": False})
