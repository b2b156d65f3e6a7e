"""move_cut: a planned model's cut moves deeper for real — requires_grad, optimizer state,
the detaching hook, checkpointing, LoRA adapters — and never back."""

from __future__ import annotations

import types

import pytest
import torch

from salf.errors import SalfError
from salf.models.anatomy import anatomy
from salf.models.tiny import tiny_model
from salf.train import LoraSettings, apply_plan, assert_truncated, move_cut
from salf.train.freeze import freeze_state, optimizer_state_bytes, unwrap


def make_plan(eof, head="frozen", num_layers=4, layers=None):
    return types.SimpleNamespace(eof=eof, num_layers=num_layers, head=head, train_embeddings=False,
                                 layers=layers)


def _ids(seed=0):
    return torch.randint(1, 500, (2, 9), generator=torch.Generator().manual_seed(seed))


def _step(model, optimizer, seed=0):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids=_ids(seed), use_cache=False)
    out.logits.float().logsumexp(-1).mean().backward()
    optimizer.step()


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_newly_frozen_layers_see_no_backward_and_stay_bit_identical(family):
    model = apply_plan(tiny_model(family), make_plan(1))
    anat = anatomy(unwrap(model))
    opt = _adamw(model)
    _step(model, opt, 0)                               # layers 2-3 train, get optimizer state
    moved = move_cut(model, 3, optimizer=opt)
    assert moved["from"] == 1 and moved["to"] == 3 and moved["params"] > 0
    assert moved["optimizer_state_bytes_freed"] > 0
    frozen_now = {id(p): p.detach().clone() for layer in list(anat.layers)[1:3]
                  for p in layer.parameters()}
    assert frozen_now and not any(p.requires_grad for layer in list(anat.layers)[:3]
                                  for p in layer.parameters())
    assert all(p not in opt.state for layer in list(anat.layers)[:3] for p in layer.parameters())
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_groups & set(frozen_now)
    fired = []
    hooks = [layer.register_full_backward_hook(lambda m, gi, go, i=i: fired.append(i))
             for i, layer in enumerate(anat.layers)]
    try:
        for seed in (1, 2):
            _step(model, opt, seed)
    finally:
        for h in hooks:
            h.remove()
    assert fired and set(fired) == {3}                 # only the last layer runs backward
    for layer in list(anat.layers)[1:3]:
        for p in layer.parameters():
            assert torch.equal(p, frozen_now[id(p)])   # bit-identical since the move
    assert freeze_state(model).cut_module is anat.layers[3]
    assert_truncated(model)


def test_optimizer_state_shrinks_to_the_layers_that_still_train():
    model = apply_plan(tiny_model("llama"), make_plan(0))
    opt = _adamw(model)
    _step(model, opt)
    before = optimizer_state_bytes(opt)
    move_cut(model, 2, optimizer=opt)
    after = optimizer_state_bytes(opt)
    anat = anatomy(model)
    params = [p for layer in list(anat.layers)[:2] for p in layer.parameters()]
    # AdamW: exp_avg + exp_avg_sq per weight (fp32), and a scalar step per tensor
    assert before - after == 2 * 4 * sum(p.numel() for p in params) + 4 * len(params)
    # a fresh optimizer over what still trains has the same groups: what a resumed run builds
    fresh = _adamw(model)
    assert [len(g["params"]) for g in fresh.param_groups] == [len(g["params"]) for g in opt.param_groups]


def test_lora_adapters_in_newly_frozen_layers_freeze_too():
    model = apply_plan(tiny_model("llama"), make_plan(1), lora=LoraSettings(r=2))
    opt = _adamw(model)
    _step(model, opt)
    report = move_cut(model, 2, optimizer=opt)
    assert report["tensors"] and all("lora_" in n and ".layers.1." in n for n in report["tensors"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".layers.2." in n or ".layers.3." in n) for n in trainable)
    assert_truncated(model)


def test_checkpointing_stays_on_trainable_layers_after_a_move():
    model = apply_plan(tiny_model("llama"), make_plan(0), gradient_checkpointing=True)
    anat = anatomy(model)
    assert all(layer.gradient_checkpointing for layer in anat.layers)
    move_cut(model, 2)
    assert [layer.gradient_checkpointing for layer in anat.layers] == [False, False, True, True]
    opt = _adamw(model)
    _step(model, opt)                                  # the first trainable layer still trains
    assert anat.layers[2].self_attn.q_proj.weight.grad is not None
    assert anat.layers[1].self_attn.q_proj.weight.grad is None
    assert_truncated(model)


def test_the_cut_never_moves_back_and_never_freezes_everything():
    model = apply_plan(tiny_model("llama"), make_plan(2))
    with pytest.raises(SalfError, match="only move deeper"):
        move_cut(model, 1)
    with pytest.raises(SalfError, match="nothing would train"):
        move_cut(model, 4)
    assert move_cut(model, 2)["params"] == 0           # staying put is a no-op
    full = apply_plan(tiny_model("llama"), types.SimpleNamespace(eof=0, num_layers=4, head="trainable",
                                                                 train_embeddings=True))
    with pytest.raises(SalfError, match="full fine-tuning"):
        move_cut(full, 1)
    subset = apply_plan(tiny_model("llama"), make_plan(1, layers=[1, 3]))
    with pytest.raises(SalfError, match="layer set"):
        move_cut(subset, 2)


def test_an_untied_head_copy_allows_the_deepest_cut():
    model = apply_plan(tiny_model("llama"), make_plan(1, head="untied-copy"))
    move_cut(model, 4)
    anat = anatomy(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "lm_head.weight" in trainable and not any(".layers." in n for n in trainable)
    assert freeze_state(model).cut_module is (anat.final_norm or anat.head)
    assert_truncated(model)
