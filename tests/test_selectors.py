"""Baseline layer selectors (salf.selectors) on tiny llama / gpt2 models with hand-built batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from salf.errors import SalfError
from salf.models.anatomy import anatomy
from salf.models.tiny import TINY_VOCAB, tiny_model
from salf.selectors import (NEEDS_DATA, SELECTORS, SelectorContext, block_influence,
                            matrix_snr, run_selector, singular_value_snr, training_loss)
from salf.selectors.gradnorm import layer_grad_norms, prefix_mass_cut
from salf.selectors.influence import suffix_mass_cut
from salf.selectors.spectrum import aggregate_layer_scores

FAMILIES = ["llama", "gpt2"]
PAD = 0


# ------------------------------------------------------------------ batches

def _classification_batch(seed: int, lengths=(9, 5, 12, 7), T: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.full((B, T), PAD, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, n in enumerate(lengths):  # left padding: the target position is -1
        ids[b, T - n:] = torch.randint(1, TINY_VOCAB, (n,), generator=g)
        mask[b, T - n:] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "target_ids": torch.randint(1, TINY_VOCAB, (B,), generator=g),
            "label_index": torch.zeros(B, dtype=torch.long)}


def _sft_batch(seed: int, prompt=(4, 3, 6), response=(5, 2, 4), T: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    B = len(prompt)
    ids = torch.full((B, T), PAD, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt, response)):  # right padding
        ids[b, :p + r] = torch.randint(1, TINY_VOCAB, (p + r,), generator=g)
        mask[b, :p + r] = 1
        labels[b, p:p + r] = ids[b, p:p + r]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(kind: str, n: int = 2):
    make = _classification_batch if kind == "classification" else _sft_batch
    return lambda: iter([make(seed) for seed in range(n)])


def _ctx(model, kind="classification", n=2, **kw) -> SelectorContext:
    return SelectorContext(model=model, anat=anatomy(model), batches=_batches(kind, n), **kw)


def _silence_layer(model, family: str, index: int) -> None:
    """Zero a layer's residual-branch output projections: the layer becomes the identity."""
    layer = anatomy(model).layers[index]
    with torch.no_grad():
        if family == "gpt2":
            for proj in (layer.attn.c_proj, layer.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        else:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


# ------------------------------------------------------------------ registry / interface

def test_registry_has_every_baseline():
    assert set(SELECTORS) == {"full", "lora", "freeze-half", "freeze-first-k", "random",
                              "spectrum", "block-influence", "block-influence-cut", "grad-norm"}


def test_unknown_selector_and_parameter_raise_salf_error():
    ctx = SelectorContext(tiny_model("gpt2"))
    with pytest.raises(SalfError) as err:
        run_selector("salf-magic", ctx)
    assert "freeze-half" in str(err.value) and "spectrum" in str(err.value)
    with pytest.raises(SalfError, match="unknown parameter"):
        run_selector("freeze-half", ctx, k=3)


def test_data_selectors_need_batches():
    ctx = SelectorContext(tiny_model("gpt2"))
    for name in NEEDS_DATA:
        with pytest.raises(SalfError, match="needs data"):
            run_selector(name, ctx)


@pytest.mark.parametrize("budget", [0, 5, -1])
def test_budget_is_validated(budget):
    ctx = SelectorContext(tiny_model("gpt2"), budget_layers=budget)
    with pytest.raises(SalfError, match="budget_layers"):
        run_selector("spectrum", ctx)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["classification", "sft"])
def test_every_selector_returns_a_valid_selection(family, kind):
    model = tiny_model(family)
    L = 4
    ctx = _ctx(model, kind)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for name in SELECTORS:
        params = {"k": 1} if name == "freeze-first-k" else {}
        sel = run_selector(name, ctx, **params)
        assert sel.name == name and sel.num_layers == L
        assert sel.trainable_layers == sorted(set(sel.trainable_layers))
        assert sel.trainable_layers and all(0 <= i < L for i in sel.trainable_layers)
        assert sel.eof_equivalent == L - len(sel.trainable_layers)
        if sel.eof is not None:
            assert 0 <= sel.eof <= L - 1
            assert sel.trainable_layers == list(range(sel.eof, L))
        if sel.scores is not None:
            assert len(sel.scores) == L and all(math.isfinite(s) for s in sel.scores)
        assert sel.reason
        json.dumps(sel.to_dict(), allow_nan=False)  # JSON-clean (no inf / nan)
    # selectors leave the model as they found it
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


# ------------------------------------------------------------------ rule-of-thumb selectors

def test_fixed_rules():
    model = tiny_model("llama", num_layers=5)
    ctx = SelectorContext(model)
    full = run_selector("full", ctx)
    assert full.eof is None and full.trainable_layers == [0, 1, 2, 3, 4]
    assert full.params["embeddings_trainable"] is True and full.eof_equivalent == 0
    lora = run_selector("lora", ctx)
    assert lora.lora and lora.eof == 0 and lora.trainable_layers == [0, 1, 2, 3, 4]
    half = run_selector("freeze-half", ctx)
    assert half.eof == 2 and half.trainable_layers == [2, 3, 4]
    k3 = run_selector("freeze-first-k", ctx, k=3)
    assert k3.eof == 3 and k3.trainable_layers == [3, 4] and not k3.lora
    for bad in (None, -1, 5, 2.0, True):
        with pytest.raises(SalfError):
            run_selector("freeze-first-k", ctx, k=bad)


def test_random_is_seeded_and_in_range():
    model = tiny_model("gpt2", num_layers=8)
    picks = [run_selector("random", SelectorContext(model, seed=s)).eof for s in range(40)]
    assert all(1 <= k <= 7 for k in picks)
    assert len(set(picks)) >= 4  # actually random across seeds
    again = [run_selector("random", SelectorContext(model, seed=s)).eof for s in range(40)]
    assert picks == again  # reproducible
    sel = run_selector("random", SelectorContext(model, seed=3, budget_layers=3), mode="set")
    assert sel.eof is None and len(sel.trainable_layers) == 3 and sel.eof_equivalent == 5
    with pytest.raises(SalfError):
        run_selector("random", SelectorContext(model), mode="bogus")


# ------------------------------------------------------------------ spectrum

def _reference_snr(w: np.ndarray) -> float:
    """Spectrum's SNR computed independently with numpy."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    q75, q25 = np.percentile(s, [75, 25])
    sigma = (q75 - q25) / 1.349
    n, m = w.shape
    eps = sigma * (1 + np.sqrt(min(n, m) / max(n, m)))
    return s[s > eps].sum() / s[s <= eps].sum()


def _low_rank_plus_noise(n, m, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, rank, generator=g) @ torch.randn(rank, m, generator=g) * 3 / m ** 0.5
    return signal + noise * torch.randn(n, m, generator=g) / m ** 0.5


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 40)])
def test_spectrum_snr_matches_direct_computation(shape):
    n, m = shape
    structured = _low_rank_plus_noise(n, m, rank=4, noise=0.1, seed=1)
    noise = torch.randn(n, m, generator=torch.Generator().manual_seed(2)) / m ** 0.5
    for w in (structured, noise):
        raw = matrix_snr(w, normalize="none")
        assert raw == pytest.approx(_reference_snr(w.numpy()), rel=1e-4)
        top = np.linalg.svd(w.numpy().astype(np.float64), compute_uv=False)[0]
        assert matrix_snr(w) == pytest.approx(raw / top, rel=1e-4)  # reference code: / s_1
    # low rank + noise carries far more signal than pure noise
    assert matrix_snr(structured, "none") > 5 * matrix_snr(noise, "none")
    # the raw ratio is scale-free; the reference normalisation scales as 1 / |W|
    assert matrix_snr(10 * noise, "none") == pytest.approx(matrix_snr(noise, "none"), rel=1e-4)
    assert matrix_snr(10 * noise) == pytest.approx(matrix_snr(noise) / 10, rel=1e-4)


def test_spectrum_max_normalisation_can_invert_the_ordering():
    """A property of the reference definition (docs/selectors.md): dividing by s_1 can rank
    low-rank + unit noise below pure noise although its raw SNR is much higher."""
    structured = _low_rank_plus_noise(64, 64, rank=4, noise=1.0, seed=1)
    noise = torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) / 8
    assert matrix_snr(structured, "none") > 2 * matrix_snr(noise, "none")
    assert matrix_snr(structured) < matrix_snr(noise)


def test_spectrum_snr_edge_cases():
    assert matrix_snr(torch.zeros(8, 8)) == 0.0
    # all singular values equal: nothing inside the bulk, the reference divides by 1
    s = torch.ones(8)
    assert singular_value_snr(s, 8, 8, "none") == pytest.approx(8.0)


def test_spectrum_layer_scores_and_pick():
    model = tiny_model("llama")
    anat = anatomy(model)
    # give layer 1 (0-based) strongly structured matrices everywhere
    with torch.no_grad():
        for i, (name, p) in enumerate(anat.layers[1].named_parameters()):
            if p.ndim == 2:
                p.copy_(_low_rank_plus_noise(*p.shape, rank=2, noise=0.05, seed=10 + i))
    ctx = SelectorContext(model, budget_layers=1)
    sel = run_selector("spectrum", ctx, normalize="none")
    assert sel.trainable_layers == [1] and sel.eof is None and sel.eof_equivalent == 3
    by_type = sel.params["snr_by_type"]
    assert "self_attn.q_proj.weight" in by_type and "mlp.down_proj.weight" in by_type
    assert not any("layernorm" in t for t in by_type)  # 1-D parameters are skipped
    assert by_type["mlp.up_proj.weight"][2] == pytest.approx(
        matrix_snr(anat.layers[2].mlp.up_proj.weight, "none"))
    assert sel.scores[1] == max(sel.scores) == 1.0  # best rank in every type
    mean = run_selector("spectrum", ctx, normalize="none", aggregate="mean")
    expected = [np.mean([v[i] for v in by_type.values()]) for i in range(4)]
    assert mean.scores == pytest.approx(expected)


def test_spectrum_aggregation_rules():
    per_layer = [{"a": 1.0, "b": 10.0}, {"a": 3.0, "b": 30.0}, {"a": 2.0, "b": 30.0}]
    assert aggregate_layer_scores(per_layer, "type-rank") == pytest.approx([0.0, 0.875, 0.625])
    assert aggregate_layer_scores(per_layer, "type-normalized") == pytest.approx(
        [(1 / 3 + 1 / 3) / 2, 1.0, (2 / 3 + 1.0) / 2])
    assert aggregate_layer_scores(per_layer, "mean") == pytest.approx([5.5, 16.5, 16.0])


# ------------------------------------------------------------------ block influence

def test_block_influence_matches_hidden_states_and_ignores_pads():
    model = tiny_model("llama")
    batch = _classification_batch(0)
    bi, tokens = block_influence(_ctx(model, n=1), max_batches=None)
    assert tokens == int(batch["attention_mask"].sum())
    with torch.no_grad():
        hs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states
    m = batch["attention_mask"].bool()
    for l in range(3):  # hs[l] is layer l's input; hs[l+1] its output (the last one is normed)
        cos = torch.nn.functional.cosine_similarity(hs[l], hs[l + 1], dim=-1)[m]
        assert bi[l] == pytest.approx(1 - cos.mean().item(), abs=1e-5)
    # right-padded batch == the same examples one by one without padding (token-weighted)
    sft = _sft_batch(3)
    padded, n_pad = block_influence(
        SelectorContext(model, batches=lambda: iter([sft])), max_batches=None)
    singles = []
    for b in range(sft["input_ids"].shape[0]):
        n = int(sft["attention_mask"][b].sum())
        singles.append({"input_ids": sft["input_ids"][b:b + 1, :n],
                        "attention_mask": sft["attention_mask"][b:b + 1, :n]})
    unpadded, n_single = block_influence(
        SelectorContext(model, batches=lambda: iter(singles)), max_batches=None)
    assert n_pad == n_single
    assert padded == pytest.approx(unpadded, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_layer_has_zero_block_influence(family):
    model = tiny_model(family)
    _silence_layer(model, family, 2)
    ctx = _ctx(model, budget_layers=3)
    sel = run_selector("block-influence", ctx)
    assert abs(sel.scores[2]) < 1e-5
    assert min(range(4), key=lambda i: sel.scores[i]) == 2
    assert all(sel.scores[i] > 1e-3 for i in (0, 1, 3))
    assert sel.trainable_layers == [0, 1, 3] and sel.eof is None and sel.eof_equivalent == 1


def test_block_influence_cut_rule():
    assert suffix_mass_cut([0.5, 0.1, 0.2, 0.2], 0.8) == 0
    assert suffix_mass_cut([0.05, 0.05, 0.4, 0.5], 0.8) == 2
    assert suffix_mass_cut([0.0, 0.0, 0.0, 1.0], 0.8) == 3
    assert suffix_mass_cut([0.25] * 4, 0.5) == 2
    assert suffix_mass_cut([0.0] * 4, 0.8) == 0
    # on a model whose first two layers are the identity, the cut freezes them
    model = tiny_model("gpt2")
    _silence_layer(model, "gpt2", 0)
    _silence_layer(model, "gpt2", 1)
    sel = run_selector("block-influence-cut", _ctx(model), mass=0.8)
    assert sel.eof == 2 and sel.trainable_layers == [2, 3]
    assert sel.params["suffix_share"] == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------ gradient norm

@pytest.mark.parametrize("family,kind", [("llama", "classification"), ("gpt2", "sft")])
def test_grad_norms_match_manual_backward(family, kind):
    model = tiny_model(family)
    ctx = _ctx(model, kind, n=2)
    norms, used = layer_grad_norms(ctx, n_batches=2)
    assert used == 2
    expected = np.zeros(4)
    for batch in _batches(kind, 2)():
        model.zero_grad(set_to_none=True)
        if kind == "classification":
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, batch["target_ids"])
            assert training_loss(model, batch).item() == pytest.approx(loss.item(), rel=1e-5)
        else:
            loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        for i, layer in enumerate(anatomy(model).layers):
            expected[i] += math.sqrt(sum(float(p.grad.pow(2).sum()) for p in layer.parameters()
                                         if p.grad is not None))
    model.zero_grad(set_to_none=True)
    assert norms == pytest.approx(list(expected / 2), rel=1e-4)


def test_grad_norm_cut_rule_and_frozen_layers():
    assert prefix_mass_cut([0.1, 0.05, 0.3, 0.55], 0.2) == 2
    assert prefix_mass_cut([0.3, 0.1, 0.3, 0.3], 0.2) == 0
    assert prefix_mass_cut([0.0, 0.0, 0.0, 1.0], 0.2) == 3  # never past L-1
    model = tiny_model("llama")
    for i in (0, 1):
        anatomy(model).layers[i].requires_grad_(False)
    sel = run_selector("grad-norm", _ctx(model), n_batches=2)
    assert sel.scores[0] == 0.0 and sel.scores[1] == 0.0
    assert all(s > 0 for s in sel.scores[2:])
    assert sum(sel.scores) == pytest.approx(1.0)
    assert sel.eof is not None and sel.eof >= 2
    assert sel.trainable_layers == list(range(sel.eof, 4))
    # flags were respected, not flipped; no .grad left behind
    assert not any(p.requires_grad for p in anatomy(model).layers[0].parameters())
    assert all(p.requires_grad for p in anatomy(model).layers[2].parameters())
    assert all(p.grad is None for p in model.parameters())


def test_grad_norm_with_whole_stack_frozen_raises():
    model = tiny_model("gpt2")
    anatomy(model).layers.requires_grad_(False)
    with pytest.raises(SalfError, match="frozen"):
        run_selector("grad-norm", _ctx(model))
