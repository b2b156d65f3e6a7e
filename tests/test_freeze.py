"""apply_plan: freezing, truncated backward, the traps, tied heads, LoRA placement."""

from __future__ import annotations

import types

import pytest
import torch

from salf.errors import SalfError
from salf.models.anatomy import anatomy, layer_output
from salf.models.tiny import tiny_model
from salf.train import LoraSettings, apply_plan, assert_truncated
from salf.train.freeze import unwrap


def make_plan(eof, head="frozen", num_layers=4):
    return types.SimpleNamespace(eof=eof, num_layers=num_layers, head=head, train_embeddings=False)


def _ids(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (batch, length), generator=g)


def _probe(model, eof, *, call_enable_input_require_grads=False):
    """One forward/backward with probes; returns what the probes saw."""
    base = unwrap(model)
    anat = anatomy(base)
    fired, outputs_require_grad, cut_input = [], [], []
    handles = []
    for i, layer in enumerate(list(anat.layers)[:eof]):
        handles.append(layer.register_full_backward_hook(lambda m, gi, go, i=i: fired.append(i)))
        handles.append(layer.register_forward_hook(
            lambda m, a, out: outputs_require_grad.append(layer_output(out).requires_grad)))
    if eof < anat.num_layers:
        # registered after apply_plan's detach hook, so it sees what the layer really gets
        handles.append(anat.layers[eof].register_forward_pre_hook(
            lambda m, args, kwargs: cut_input.append(
                (args[0] if args else kwargs["hidden_states"]).requires_grad), with_kwargs=True))
    if call_enable_input_require_grads:
        model.enable_input_require_grads()   # the PEFT / checkpointing trap
    model.train()
    try:
        out = model(input_ids=_ids(), use_cache=False)
        out.logits.float().logsumexp(-1).mean().backward()
    finally:
        for h in handles:
            h.remove()
    return fired, outputs_require_grad, cut_input


def _check_grads(model, eof, head):
    base = unwrap(model)
    anat = anatomy(base)
    below = {id(p) for m in anat.embeddings for p in m.parameters()}
    for layer in list(anat.layers)[:eof]:
        below.update(id(p) for p in layer.parameters())
    n_trained = 0
    for name, p in model.named_parameters():
        if id(p) in below:
            assert not p.requires_grad and p.grad is None, name
        elif p.requires_grad:
            assert p.grad is not None, name
            n_trained += 1
        else:
            assert p.grad is None, name
    assert n_trained > 0
    if head == "frozen":
        assert all(p.grad is None for p in anat.head.parameters())


@pytest.mark.parametrize("family,head", [("llama", "frozen"), ("gpt2", "untied-copy"),
                                         ("mistral", "trainable")])
@pytest.mark.parametrize("mode", ["plain", "checkpointing", "lora-trap", "lora-checkpointing"])
def test_backward_stops_at_the_cut(family, head, mode):
    eof = 2
    lora = LoraSettings(r=4) if mode.startswith("lora") else None
    gc = mode.endswith("checkpointing")
    model = apply_plan(tiny_model(family), make_plan(eof, head), lora=lora, gradient_checkpointing=gc)
    fired, outs_rg, cut_rg = _probe(model, eof, call_enable_input_require_grads=(mode == "lora-trap"))
    assert fired == []                      # no backward through frozen layers
    assert outs_rg == [False] * eof         # no autograd graph built below the cut
    assert cut_rg == [False]                # the first trainable layer gets a leaf input
    _check_grads(model, eof, head)
    assert_truncated(model)                 # and the re-check still passes after the trap


def test_negative_control_the_trap_is_real():
    """Without apply_plan, freezing by requires_grad + enable_input_require_grads backprops
    through the frozen prefix: the probes above would catch it."""
    model = tiny_model("llama")
    anat = anatomy(model)
    model.requires_grad_(False)
    for layer in list(anat.layers)[2:]:
        layer.requires_grad_(True)
    fired, outs_rg, _ = _probe(model, 2, call_enable_input_require_grads=True)
    assert sorted(fired) == [0, 1] and outs_rg == [True, True]


def _saved_tensors(model):
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=_ids(), use_cache=False)
    del out
    return count[0]


def test_saved_activations_shrink_with_the_cut():
    # eof 4 trains only the head's untied copy: no decoder layer saves anything
    counts = [_saved_tensors(apply_plan(tiny_model("llama"), make_plan(k, head="untied-copy")))
              for k in (0, 2, 4)]
    assert counts[0] > counts[1] > counts[2]
    per_layer = (counts[0] - counts[1]) / 2
    assert counts[1] - counts[2] == pytest.approx(2 * per_layer)   # each trainable layer saves the same


def test_checkpointing_only_on_trainable_layers_even_if_reenabled():
    model = apply_plan(tiny_model("llama"), make_plan(2), gradient_checkpointing=True)
    anat = anatomy(model)
    assert [layer.gradient_checkpointing for layer in anat.layers] == [False, False, True, True]
    # a later enable (e.g. the Trainer's, with reentrant checkpointing) keeps the restriction
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert [layer.gradient_checkpointing for layer in anat.layers] == [False, False, True, True]
    assert anat.layers[3]._gradient_checkpointing_func.keywords["use_reentrant"] is False
    assert not getattr(model, "_require_grads_hooks", None)
    fired, outs_rg, _ = _probe(model, 2)
    assert fired == [] and outs_rg == [False, False]
    _check_grads(model, 2, "frozen")


@pytest.mark.parametrize("eof", [0, 4])
def test_edge_cuts(eof):
    model = apply_plan(tiny_model("qwen2"), make_plan(eof, head="untied-copy"))
    anat = anatomy(model)
    fired, outs_rg, _ = _probe(model, eof)
    assert fired == [] and not any(outs_rg)
    _check_grads(model, eof, "untied-copy")
    assert anat.final_norm.weight.grad is not None and anat.head.weight.grad is not None
    assert all(p.grad is None for m in anat.embeddings for p in m.parameters())


def test_untied_copy_survives_tie_weights_and_save_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    emb_before = model.get_input_embeddings().weight.detach().clone()
    model = apply_plan(model, make_plan(2, head="untied-copy"))
    anat = anatomy(model)
    assert not anat.tied and model.config.tie_word_embeddings is False
    assert torch.equal(anat.head.weight, emb_before) and anat.head.weight.requires_grad
    with torch.no_grad():
        anat.head.weight.add_(1.0)
    model.tie_weights()       # transformers 5 re-ties from config + all_tied_weights_keys
    assert anatomy(model).head.weight is not model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    la = anatomy(loaded)
    assert not la.tied
    assert torch.equal(la.head.weight, emb_before + 1.0)
    assert torch.equal(loaded.get_input_embeddings().weight, emb_before)


def test_plan_errors():
    with pytest.raises(SalfError, match="untied"):
        apply_plan(tiny_model("llama"), make_plan(2, head="trainable"))
    with pytest.raises(SalfError, match=r"eof must be an integer in \[0, 4\]"):
        apply_plan(tiny_model("llama"), make_plan(5))
    with pytest.raises(SalfError, match="6-layer"):
        apply_plan(tiny_model("llama"), make_plan(2, num_layers=6))
    with pytest.raises(SalfError, match="head"):
        apply_plan(tiny_model("llama"), make_plan(2, head="copy"))
    with pytest.raises(SalfError, match="nothing would train"):
        apply_plan(tiny_model("llama"), make_plan(4), lora=LoraSettings())
    with pytest.raises(SalfError, match="LoRA needs at least one trainable layer"):
        apply_plan(tiny_model("llama"), make_plan(4, head="untied-copy"), lora=LoraSettings())
    plan = types.SimpleNamespace(eof=1, num_layers=4, head="trainable", train_embeddings=True)
    with pytest.raises(SalfError, match="full fine-tuning"):
        apply_plan(tiny_model("llama"), plan)
    model = apply_plan(tiny_model("llama"), make_plan(1))
    with pytest.raises(SalfError, match="already"):
        apply_plan(model, make_plan(2))
    assert model.salf_plan.eof == 1


def test_assert_truncated_catches_tampering():
    model = apply_plan(tiny_model("llama"), make_plan(2))
    anatomy(model).layers[0].self_attn.q_proj.weight.requires_grad_(True)
    with pytest.raises(SalfError, match="below the cut"):
        assert_truncated(model)

    model = apply_plan(tiny_model("llama"), make_plan(2))
    type(model).enable_input_require_grads(model)     # bypassing the neutralised method
    with pytest.raises(SalfError, match="require_grads"):
        assert_truncated(model)


def test_lora_only_on_layers_above_the_cut():
    model = apply_plan(tiny_model("llama"), make_plan(3), lora=LoraSettings(r=2))
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(".layers.3." in n for n in lora_names)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_names}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    gpt2 = apply_plan(tiny_model("gpt2"), make_plan(2), lora=LoraSettings(r=2))
    names = [n for n, _ in gpt2.named_parameters() if "lora_" in n]
    assert names and all(".h.2." in n or ".h.3." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}


def test_full_fine_tuning_plan_trains_everything():
    """FreezePlan.full(): train_embeddings=True, the baseline every cut is compared against."""
    plan = types.SimpleNamespace(eof=0, num_layers=4, head="trainable", train_embeddings=True)
    model = apply_plan(tiny_model("llama"), plan, gradient_checkpointing=True)   # tied head is fine here
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    model(input_ids=_ids(), use_cache=False).logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert_truncated(model)


def test_non_contiguous_set_trains_only_listed_layers():
    """A plan with `layers` (Spectrum-style set): listed layers change, the others above the
    cut pass gradients but never get one; nothing below the cut is touched."""
    from salf.models import tiny_model
    from salf.plan import FreezePlan
    from salf.train import apply_plan

    model = tiny_model("llama", num_layers=6)
    plan = FreezePlan.manual(2, 6, layers=[2, 4])
    model = apply_plan(model, plan)
    model.train()
    ids = torch.randint(0, 400, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    layers = model.model.layers
    for i, layer in enumerate(layers):
        grads = [p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()]
        assert all(grads) if i in (2, 4) else not any(grads), i
