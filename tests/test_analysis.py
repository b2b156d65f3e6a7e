"""Analysis core: semantic basis, streaming trace, gains and policies.

Tiny random models from salf.models.tiny and hand-built batches in the
salf.data collate format (classification: left padding + target_ids;
SFT: right padding + labels with -100 outside the response).
"""

from __future__ import annotations

import gc
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from salf.analysis import basis as basis_mod
from salf.analysis import (ALPHA_PRIOR, R2_MIN, VALID_POLICIES, Trace, auc, benefit_curve,
                           choose_cut, fit_depth_law, inference_gains, semantic_basis,
                           transition_onset)
from salf.analysis import trace as run_trace
from salf.errors import SalfError
from salf.models.anatomy import anatomy, layer_output
from salf.models.tiny import TINY_VOCAB, tiny_model

LABELS = [17, 42, 99]          # label first-token ids (3-way for the multiclass AUC)


# --------------------------------------------------------------------------- helpers


def cls_batch(B=6, T=10, labels=LABELS[:2], seed=0):
    """Left-padded classification batch: row b has b % 4 pad tokens on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        k = b % 4
        ids[b, :k] = 0
        mask[b, :k] = 0
    li = torch.arange(B) % len(labels)
    return {"input_ids": ids, "attention_mask": mask,
            "target_ids": torch.tensor(labels)[li], "label_index": li}


def sft_batch(B=3, T=24, prompt=6, seed=0):
    """Right-padded SFT batch: row b has a prompt of `prompt` tokens, response after, b*3 pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    labels[:, :prompt] = -100
    for b in range(B):
        pad = b * 3
        if pad:
            ids[b, T - pad:] = 0
            mask[b, T - pad:] = 0
            labels[b, T - pad:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family, **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            m = tiny_model(family, **kw)
            cache[key] = (m, anatomy(m))
        return cache[key]

    return get


def reference_spaces(model, anat, batch, bi, pi):
    """t_l at (bi, pi) from output_hidden_states, normalised carefully.

    In transformers >= 4.5x the last entry of hidden_states is already normed by the
    model, the earlier ones are raw: apply N to 0..L-1 only.
    """
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos,
                    output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        L = anat.num_layers
        assert len(hs) == L + 1
        ts = [anat.normalize(hs[l][bi, pi]).float() for l in range(L)] + [hs[L][bi, pi].float()]
        return ts, out.logits[bi, pi].float()


# --------------------------------------------------------------------------- basis


def test_basis_matches_pinv_and_normal_equations():
    torch.manual_seed(0)
    W = torch.randn(50, 8, dtype=torch.float64)
    ids = [0, 3, 49, 3]
    b = semantic_basis(W, ids, ridge=1e-12, dtype=torch.float64)
    assert b.shape == (4, 8)
    pinv = torch.linalg.pinv(W)                                # (d, V)
    torch.testing.assert_close(b, pinv[:, ids].T, rtol=1e-8, atol=1e-10)
    # V > d: W b_v is the least-squares fit of e_v; the residual is orthogonal to range(W)
    E = torch.eye(50, dtype=torch.float64)[ids]
    resid = b @ W.T - E
    assert (resid @ W).abs().max() < 1e-9


def test_basis_square_full_rank_gives_unit_logits():
    torch.manual_seed(1)
    W = torch.randn(16, 16) + 4 * torch.eye(16)
    b = semantic_basis(W, list(range(16)), ridge=1e-10)
    torch.testing.assert_close(b @ W.T, torch.eye(16), atol=1e-4, rtol=0)


def test_basis_ridge_relative_and_near_singular():
    W = torch.randn(40, 6, dtype=torch.float64)
    W[:, 5] = W[:, 4]                                          # rank-deficient
    b = semantic_basis(W, [1, 2], ridge=1e-6, dtype=torch.float64)
    assert torch.isfinite(b).all()
    with pytest.raises(SalfError, match="outside the vocabulary"):
        semantic_basis(W, [40])


def test_basis_disk_cache(tmp_path, monkeypatch):
    W = torch.randn(64, 8)
    first = semantic_basis(W, [5, 7], cache_dir=tmp_path)
    files = list(tmp_path.glob("basis-*.safetensors"))
    assert len(files) == 1
    basis_mod.clear_cache()

    def boom(_W):
        raise AssertionError("Gram matrix recomputed despite the disk cache")

    monkeypatch.setattr(basis_mod, "_gram", boom)
    again = semantic_basis(W, [7, 5], cache_dir=tmp_path)
    torch.testing.assert_close(again, first.flip(0))
    # a different W gets a different key (and would need the Gram matrix)
    with pytest.raises(AssertionError, match="recomputed"):
        semantic_basis(W * 2, [5], cache_dir=tmp_path)


def test_basis_of_model_uses_unembedding(models):
    model, anat = models("llama")
    b = semantic_basis(anat, LABELS)
    ref = torch.linalg.pinv(anat.unembedding.detach().double())[:, LABELS].T.float()
    torch.testing.assert_close(b, ref, atol=1e-4, rtol=1e-3)


# --------------------------------------------------------------------------- trace


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_trace_classification_finite(models, family):
    model, anat = models(family)
    batches = [cls_batch(labels=LABELS, seed=s) for s in range(2)]
    tr = run_trace(model, anat, batches, "classification", label_token_ids=LABELS,
                   logit_lens=True, progress=False)
    L = anat.num_layers
    assert tr.num_layers == L and len(tr.spaces) == L + 1
    assert [s["space"] for s in tr.spaces] == list(range(L + 1))
    for s in tr.spaces:
        for key in ("deviation", "label_ce", "lens_acc", "margin_auc", "logit_lens_ce",
                    "logit_lens_acc"):
            assert s[key] is not None and math.isfinite(s[key]), (family, key, s)
        assert 0.0 <= s["deviation"] <= 2.0
        assert s["n_targets"] == 12
    assert tr.timing["batches"] == 2 and tr.timing["targets"] == 12
    assert tr.task == "classification"
    assert tr.data["n_examples"] == 12 and len(tr.data["sample_hash"]) == 64


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_trace_sft_finite_and_subsampled(models, family):
    model, anat = models(family)
    batch = sft_batch()
    tr = run_trace(model, anat, [batch], "sft", max_targets_per_example=4, logit_lens=True,
                   progress=False)
    for s in tr.spaces:
        assert math.isfinite(s["deviation"]) and math.isfinite(s["logit_lens_ce"])
        assert s["label_ce"] is None and s["margin_auc"] is None and s["lens_acc"] is None
        assert s["n_targets"] == 12                           # 3 examples x 4 targets
    again = run_trace(model, anat, [batch], "sft", max_targets_per_example=4, progress=False)
    assert again.deviations == tr.deviations                 # seeded subsampling
    other = run_trace(model, anat, [batch], "sft", max_targets_per_example=4, progress=False, seed=1)
    assert other.deviations != tr.deviations


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_trace_matches_output_hidden_states(models, family):
    """Hook-captured spaces, normed once by us, equal the reference from output_hidden_states."""
    model, anat = models(family)
    batch = cls_batch(B=5, labels=LABELS, seed=3)
    tr = run_trace(model, anat, [batch], "classification", label_token_ids=LABELS,
                   logit_lens=True, progress=False)
    B, T = batch["input_ids"].shape
    ts, logits = reference_spaces(model, anat, batch, torch.arange(B), torch.full((B,), T - 1))
    b_hat = F.normalize(semantic_basis(anat, LABELS), dim=-1)
    li = batch["label_index"]
    for l, t in enumerate(ts):
        C = F.normalize(t, dim=-1) @ b_hat.T
        dev = float((1 - C[torch.arange(B), li]).mean())
        ce = float(F.cross_entropy(C / 0.1, li))
        assert tr.spaces[l]["deviation"] == pytest.approx(dev, abs=1e-5), (family, l)
        assert tr.spaces[l]["label_ce"] == pytest.approx(ce, abs=1e-4), (family, l)
    # space L through the head reproduces the model's own logits (soft-capping included)
    y = batch["target_ids"]
    assert tr.spaces[-1]["logit_lens_ce"] == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-4)


def test_trace_sft_matches_reference(models):
    model, anat = models("llama")
    batch = sft_batch(B=2, T=12, prompt=4)
    tr = run_trace(model, anat, [batch], "sft", max_targets_per_example=100, logit_lens=True,
                   progress=False)
    labels = batch["labels"]
    bi, pi = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    y = labels[bi, pi + 1]
    ts, logits = reference_spaces(model, anat, batch, bi, pi)
    b_hat = F.normalize(semantic_basis(anat, y), dim=-1)
    for l, t in enumerate(ts):
        dev = float((1 - (F.normalize(t, dim=-1) * b_hat).sum(-1)).mean())
        assert tr.spaces[l]["deviation"] == pytest.approx(dev, abs=1e-5)
    assert tr.spaces[-1]["n_targets"] == len(y)
    assert tr.spaces[-1]["logit_lens_ce"] == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-4)


def test_left_padding_does_not_change_the_trace(models):
    model, anat = models("llama")
    batch = cls_batch(B=4, T=10, labels=LABELS[:2], seed=5)
    row = 3                                                   # 3 pad tokens
    alone = {"input_ids": batch["input_ids"][row:row + 1, 3:],
             "attention_mask": batch["attention_mask"][row:row + 1, 3:],
             "target_ids": batch["target_ids"][row:row + 1],
             "label_index": batch["label_index"][row:row + 1]}
    padded = {k: v[row:row + 1] for k, v in batch.items()}
    a = run_trace(model, anat, [alone], "classification", label_token_ids=LABELS[:2], progress=False)
    b = run_trace(model, anat, [padded], "classification", label_token_ids=LABELS[:2], progress=False)
    np.testing.assert_allclose(a.deviations, b.deviations, atol=1e-5)


def test_trace_json_roundtrip(models, tmp_path):
    model, anat = models("llama")
    tr = run_trace(model, anat, [cls_batch(labels=LABELS)], "classification",
                   label_token_ids=LABELS, progress=False,
                   model_info={"spec": "tiny-llama", "weights_hash": "abc"},
                   data_info={"source": "hand-built"}, shapes={"seq_len": 10},
                   extra={"note": "test"})
    path = tmp_path / "trace.json"
    tr.to_json(path)
    d = json.loads(path.read_text())
    for key in ("model", "data", "task", "num_layers", "spaces", "timing", "salf_version", "shapes"):
        assert key in d
    assert d["model"]["spec"] == "tiny-llama" and d["data"]["source"] == "hand-built"
    assert d["shapes"]["seq_len"] == 10 and d["shapes"]["hidden_size"] == 32
    for s in d["spaces"]:
        assert {"space", "deviation", "label_ce", "lens_acc", "margin_auc", "logit_lens_ce",
                "n_targets"} <= set(s)
        assert s["logit_lens_ce"] is None                    # logit_lens=False
    back = Trace.from_json(path)
    assert back.to_dict() == tr.to_dict()
    with pytest.raises(SalfError):
        Trace.from_json(tmp_path / "missing.json")


def test_trace_input_errors(models):
    model, anat = models("llama")
    with pytest.raises(SalfError, match="label_token_ids"):
        run_trace(model, anat, [cls_batch()], "classification", progress=False)
    right = cls_batch()
    right["attention_mask"] = right["attention_mask"].flip(-1)
    with pytest.raises(SalfError, match="left-padded"):
        run_trace(model, anat, [right], "classification", label_token_ids=LABELS[:2], progress=False)
    with pytest.raises(SalfError, match="not one of the label"):
        run_trace(model, anat, [cls_batch()], "classification", label_token_ids=[1, 2], progress=False)
    empty = sft_batch()
    empty["labels"][:] = -100
    with pytest.raises(SalfError, match="no target positions"):
        run_trace(model, anat, [empty], "sft", progress=False)
    with pytest.raises(SalfError, match="unknown task"):
        run_trace(model, anat, [empty], "regression", progress=False)


def test_nan_hidden_states_raise(models):
    model, anat = models("gpt2")

    def poison(_m, _i, out):
        h = layer_output(out)
        return h * float("nan") if isinstance(out, torch.Tensor) else (h * float("nan"),) + tuple(out[1:])

    handle = anat.layers[1].register_forward_hook(poison)
    try:
        with pytest.raises(SalfError, match=r"NaN/inf at layer 2 \(a broken checkpoint\?\)"):
            run_trace(model, anat, [cls_batch()], "classification", label_token_ids=LABELS[:2],
                      progress=False)
    finally:
        handle.remove()


def test_corrupted_weight_raises():
    model = tiny_model("llama")
    anat = anatomy(model)
    with torch.no_grad():
        anat.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(SalfError, match="NaN/inf at layer 1"):
        run_trace(model, anat, [cls_batch()], "classification", label_token_ids=LABELS[:2],
                  progress=False)


def test_memory_independent_of_sequence_length():
    """Hooks retain only (targets x d) per space: bytes do not grow with T, full states are freed."""
    model = tiny_model("llama", num_layers=6)
    anat = anatomy(model)
    L, d = anat.num_layers, anat.unembedding.shape[1]
    retained = {}
    refs = []

    def watch(_m, _i, out):                                   # runs before trace's hooks
        # weak reference to the *storage*: a detached alias or a view would keep it alive
        refs.append(StorageWeakRef(layer_output(out).untyped_storage()))

    handles = [layer.register_forward_hook(watch) for layer in anat.layers]
    handles.append(anat.layers[0].register_forward_pre_hook(
        lambda _m, args: refs.append(StorageWeakRef(args[0].untyped_storage()))))
    try:
        for T in (32, 1536):
            for kind, batch, n_targets in (
                ("classification", cls_batch(B=2, T=T, labels=LABELS[:2]), 2),
                ("sft", sft_batch(B=2, T=T, prompt=4), 2 * 16),
            ):
                run_trace(model, anat, [batch], kind, label_token_ids=LABELS[:2] if kind ==
                          "classification" else None, max_targets_per_example=16, progress=False,
                          capture_callback=lambda cap, k=(kind, T): retained.__setitem__(
                              k, cap.max_retained_bytes))
                expected = (L + 1) * n_targets * d * 4
                assert retained[(kind, T)] == expected, (kind, T, retained[(kind, T)], expected)
    finally:
        for h in handles:
            h.remove()
    assert retained[("classification", 32)] == retained[("classification", 1536)]
    assert retained[("sft", 32)] == retained[("sft", 1536)]
    # A full hidden state at T=1536 alone is 2*1536*32*4 = 393 KB, far above what was retained.
    assert retained[("sft", 1536)] < 2 * 1536 * d * 4
    gc.collect()
    assert refs and all(r.expired() for r in refs), "a layer's full output outlived the trace"


# --------------------------------------------------------------------------- gains


PLATEAU = [1.0] * 18 + [0.99, 0.97, 0.95, 0.93, 0.87, 0.86, 0.85, 0.845, 0.84, 0.83, 0.83, 0.88, 0.93]
POWER = [0.2 + 0.8 * (l + 1) ** -0.7 for l in range(13)]
ZIGZAG = [0.9, 1.1, 0.7, 1.2, 0.6, 1.0, 0.95, 1.3]
FLAT = [0.75] * 9


def test_auc_helper():
    assert auc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert auc([1, 2], [1, 1]) is None


def test_inference_gains():
    g = inference_gains([1.0, 0.9, 0.5, 0.6])
    np.testing.assert_allclose(g, [0.1, 0.4, -0.1])


def test_depth_law_recovers_power_law():
    fit = fit_depth_law(POWER)
    assert fit["ok"] and fit["r2"] > 0.999
    assert fit["alpha"] == pytest.approx(0.7, rel=0.02)
    assert fit["E"] == pytest.approx(0.2, abs=0.01) and fit["A"] == pytest.approx(0.8, rel=0.03)
    curve = benefit_curve(POWER, "depth")
    assert curve["source"] == "depth" and curve["fallback"] is None
    assert curve["alpha"] == pytest.approx(fit["alpha"])


def test_depth_law_rejects_plateau_and_falls_back_visibly():
    fit = fit_depth_law(PLATEAU)
    assert not fit["ok"] and fit["r2"] < R2_MIN and "R²" in fit["reason"]
    curve = benefit_curve(PLATEAU, "depth")
    assert curve["fallback"] == "prior" and curve["source"] == "prior"
    assert curve["fallback_reason"] == fit["reason"]
    assert curve["alpha"] == ALPHA_PRIOR and curve["E"] == min(PLATEAU)


@pytest.mark.parametrize("D", [FLAT, PLATEAU, POWER, ZIGZAG, [1.0, 0.5], [0.5, 1.0], [0.0] * 3],
                         ids=["flat", "plateau", "power", "zigzag", "L1-down", "L1-up", "zeros"])
def test_estimators_always_finite(D):
    L = len(D) - 1
    fit = fit_depth_law(D)
    for k in ("alpha", "E", "A", "r2"):
        assert math.isfinite(fit[k])
    assert isinstance(fit["ok"], bool) and fit["reason"]
    for source in ("depth", "prior"):
        c = benefit_curve(D, source)
        assert c["cuts"] == list(range(L))
        assert len(c["predicted"]) == len(c["benefit"]) == L
        assert all(math.isfinite(v) for v in c["predicted"] + c["benefit"])
        assert all(v >= 0 for v in c["benefit"])
    onset = transition_onset(D)
    assert 0 <= onset <= L
    cost = [1.0 - 0.8 * k / L for k in range(L + 1)]
    for policy in ("paper", "max-gain", "budget=1", "knee", "onset"):
        r = choose_cut(D, policy, cost=cost)
        assert 0 <= r["eof"] <= L - 1, (policy, r)
        assert math.isfinite(r["benefit"]) and r["reason"]
        json.dumps(r)                                          # JSON-ready


def test_flat_trace():
    fit = fit_depth_law(FLAT)
    assert not fit["ok"] and "flat" in fit["reason"]
    c = benefit_curve(FLAT)
    assert c["fallback"] == "prior" and c["benefit"] == [0.0] * 8
    assert transition_onset(FLAT) == 0
    assert choose_cut(FLAT, "onset")["eof"] == 0
    r = choose_cut(FLAT, "max-gain")
    assert r["eof"] == 7 and "no cut predicts a benefit" in r["reason"]


def test_onset_of_plateau_transition():
    onset = transition_onset(PLATEAU)
    # plateau 1.0, minimum 0.83: the last space within 10% of the drop (D >= 0.983) is 18
    assert onset == 19
    r = choose_cut(PLATEAU, "onset")
    assert r["eof"] == 18 and r["params"]["onset"] == 19
    assert transition_onset([1.0, 1.0, 1.0, 0.5]) == 3
    assert transition_onset([0.5, 0.6, 0.9]) == 0               # only rises
    # an early dip that recovers is not the transition (SmolLM2-like wobble near the embeddings)
    assert transition_onset([1.02, 1.0, 0.97, 1.0, 1.0, 1.0, 0.9, 0.8]) == 6
    assert transition_onset(POWER) == 1                          # descends from the start


def test_paper_rule_picks_argmax_gain():
    r = choose_cut(PLATEAU, "paper")
    gains = inference_gains(PLATEAU)
    assert r["eof"] == int(np.argmax(gains)) + 1 == 22
    assert r["params"]["argmax_layer"] == 22
    # argmax at the last layer is clipped so at least one layer trains
    r = choose_cut([1.0, 0.99, 0.98, 0.5], "paper")
    assert r["eof"] == 2 and "clipped" in r["reason"]


def test_max_gain_prefers_cheapest_among_near_ties():
    # D_k - E = 0.5 for k=0 and slightly different elsewhere: hand-check with a given law
    D = [1.0, 1.0, 1.0, 0.999, 0.6, 0.6]
    curve = benefit_curve(D, "given", alpha=0.5, floor=0.0)
    B = np.asarray(curve["benefit"])
    r = choose_cut(D, "max-gain", alpha=0.5, floor=0.0)
    best = B.max()
    ties = [k for k in range(5) if B[k] >= best - 0.01 * best]
    assert r["eof"] == max(ties)
    assert r["benefit"] == pytest.approx(B[r["eof"]])


def test_budget_and_knee():
    D = POWER
    L = len(D) - 1
    cost = [1.0 - 0.9 * k / L for k in range(L)]
    full = choose_cut(D, "max-gain", cost=cost)
    r = choose_cut(D, "budget=0.5", cost=cost)
    assert cost[r["eof"]] <= 0.5 and r["policy"] == "budget=0.5"
    feasible = [k for k in range(L) if cost[k] <= 0.5]
    B = r["curve"]["benefit"]
    assert B[r["eof"]] >= max(B[k] for k in feasible) * (1 - 0.01) - 1e-12
    assert full["benefit"] >= r["benefit"]
    with pytest.raises(SalfError, match="no cut fits budget"):
        choose_cut(D, "budget=0.05", cost=cost)
    with pytest.raises(SalfError, match="needs the predicted cost"):
        choose_cut(D, "budget=0.5")
    with pytest.raises(SalfError, match="needs the predicted cost"):
        choose_cut(D, "knee")
    k = choose_cut(D, "knee", cost=cost)
    assert 0 <= k["eof"] <= L - 1 and k["cost"] == cost[k["eof"]]


def test_knee_of_concave_curve():
    # benefit rises steeply for the first cheap steps, then saturates: knee in between
    L = 10
    cost = [1.0 - k / L for k in range(L)]                  # k=9 cheapest
    B = [0.5, 0.5, 0.5, 0.5, 0.5, 0.49, 0.45, 0.35, 0.2, 0.0]
    from salf.analysis.gains import _knee

    eof, reason = _knee(np.asarray(cost), np.asarray(B))
    assert eof in (6, 5) and "knee" in reason


def test_invalid_policies():
    for bad in ("argmax", "budget", "budget=-1", "budget=abc", ""):
        with pytest.raises(SalfError) as e:
            choose_cut(POWER, bad, cost=[1.0] * 12)
        if not bad.startswith("budget"):
            for v in VALID_POLICIES:
                assert v in str(e.value)
    with pytest.raises(SalfError, match="one entry per cut"):
        choose_cut(POWER, "knee", cost=[1.0, 0.5])


def test_gains_accept_trace_objects(models):
    model, anat = models("llama")
    tr = run_trace(model, anat, [cls_batch(labels=LABELS)], "classification",
                   label_token_ids=LABELS, progress=False)
    assert inference_gains(tr) == inference_gains(tr.to_dict()) == inference_gains(tr.deviations)
    r = choose_cut(tr, "paper")
    assert 0 <= r["eof"] < anat.num_layers


def test_max_gain_e0_variant_uses_a_zero_floor():
    """On a trace that only descends (min at the last space, as SFT traces are), max-gain with
    the pretrained floor sees no benefit anywhere; the e0 variant sees the benefit of depth."""
    from salf.analysis.gains import choose_cut

    D = [0.96, 0.97, 0.965, 0.96, 0.95, 0.93, 0.9, 0.85, 0.78]
    plain = choose_cut(D, "max-gain")
    e0 = choose_cut(D, "max-gain-e0")
    assert plain["benefit"] == 0.0 and plain["eof"] == len(D) - 2
    assert e0["policy"] == "max-gain-e0" and e0["curve"]["E"] == 0.0
    assert e0["benefit"] > 0 and e0["eof"] < plain["eof"]
