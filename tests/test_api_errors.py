"""Library calls refuse bad input with SalfError (or TypeError naming the argument) and honour
what they take (issue #22, item 15)."""

from __future__ import annotations

import json

import pytest
import torch

from salf.errors import SalfError
from salf.models import load_model
from salf.models.anatomy import anatomy
from salf.plan import FreezePlan
from salf.train import LoraSettings, SalfFreezeCallback, apply_plan, assert_truncated


def _cli_plan(spec: str, eof: int) -> FreezePlan:
    """A plan recording its model the way `salf plan` / `salf train` do (ModelInfo + tied)."""
    model, _, info = load_model(spec)
    return FreezePlan.manual(eof, info.num_layers, model=dict(info.to_dict(), tied=anatomy(model).tied))


@pytest.mark.parametrize("spec", [None, 123])
def test_load_model_refuses_a_spec_of_the_wrong_type(spec):
    with pytest.raises(TypeError, match="load_model: spec must be"):
        load_model(spec)


def test_load_model_honours_dtype_for_tiny_models():
    model, _, _ = load_model("tiny-llama", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    model, _, _ = load_model("tiny-gpt2", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="load_model: dtype must be"):
        load_model("tiny-llama", dtype="fp16")


def test_load_model_takes_a_path_to_a_folder_and_honours_dtype(tmp_path):
    model, tok, info = load_model("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _, loaded_info = load_model(tmp_path, dtype=torch.bfloat16)
    assert loaded_info.spec == str(tmp_path) and loaded_info.num_layers == info.num_layers
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_from_json_takes_the_parsed_dict_and_names_a_wrong_argument(tmp_path):
    plan = FreezePlan.manual(0, 4)
    path = plan.to_json(tmp_path / "plan.json")
    parsed = json.loads(path.read_text())
    assert FreezePlan.from_json(parsed).to_dict() == FreezePlan.from_json(path).to_dict()
    with pytest.raises(SalfError, match="missing num_layers"):
        FreezePlan.from_json({"eof": 0})
    with pytest.raises(TypeError, match="from_json: path must be"):
        FreezePlan.from_json(123)


def test_apply_plan_takes_a_plan_dict_read_from_plan_json(tmp_path):
    path = _cli_plan("tiny-llama", 0).to_json(tmp_path / "plan.json")
    with open(path) as f:
        plan_dict = json.load(f)
    model = apply_plan(load_model("tiny-llama")[0], plan_dict)
    assert isinstance(model.salf_plan, FreezePlan) and model.salf_plan.eof == 0
    assert assert_truncated(model)["eof"] == 0
    with pytest.raises(SalfError, match="plan: .*eof must be an integer in \\[0, 4\\]"):
        apply_plan(load_model("tiny-llama")[0], dict(plan_dict, eof=9))


def test_apply_plan_refuses_a_plan_of_the_wrong_type(tmp_path):
    path = FreezePlan.manual(1, 4).to_json(tmp_path / "plan.json")
    with pytest.raises(TypeError, match="apply_plan: plan must be a FreezePlan or its dict"):
        apply_plan(load_model("tiny-llama")[0], str(path))


def test_apply_plan_refuses_lora_of_the_wrong_type():
    with pytest.raises(TypeError, match="apply_plan: lora must be a LoraSettings, a dict"):
        apply_plan(load_model("tiny-llama")[0], FreezePlan.manual(1, 4), lora="yes")


def _changed_after_made():
    settings = LoraSettings(r=2)
    settings.r = 0
    return settings


@pytest.mark.parametrize("lora,says", [
    ({"r": -1}, "lora.r must be at least 1, got -1"),
    ({"alpha": 0}, "lora.alpha must be at least 1, got 0"),
    ({"dropout": 1.5}, "lora.dropout must be at least 0 and below 1, got 1.5"),
    ({"r": "4"}, "lora.r must be an integer, got '4'"),
    ({"target_modules": "q_proj"}, "lora.target_modules must be a list of module names"),
    ({"rank": 4}, "unknown LoRA setting.s. rank"),
    (_changed_after_made(), "lora.r must be at least 1, got 0"),
])
def test_apply_plan_names_a_bad_lora_field(lora, says):
    with pytest.raises(SalfError, match=says):
        apply_plan(load_model("tiny-llama")[0], FreezePlan.manual(1, 4), lora=lora)


def test_apply_plan_checks_the_plan_belongs_to_the_model():
    plan = _cli_plan("tiny-llama", 2)
    gpt2 = load_model("tiny-gpt2")[0]
    with pytest.raises(SalfError, match="weights_hash differs .*tiny-llama.* but tiny-gpt2 .*"
                                        "allow_different_weights=True"):
        apply_plan(gpt2, plan)
    assert assert_truncated(apply_plan(gpt2, plan, allow_different_weights=True))["eof"] == 2
    assert assert_truncated(apply_plan(load_model("tiny-llama")[0], plan))["eof"] == 2
    # a hand-built plan records no model: only its layer count is checked
    assert assert_truncated(apply_plan(load_model("tiny-gpt2")[0], FreezePlan.manual(2, 4)))["eof"] == 2
    with pytest.raises(SalfError, match="num_layers differs"):
        apply_plan(load_model("tiny-gpt2")[0], FreezePlan.manual(2, 6), allow_different_weights=True)
    # the same weights in bf16 (a GPU user's load) hash otherwise: only the layer count counts
    half = load_model("tiny-llama", dtype=torch.bfloat16)[0]
    assert assert_truncated(apply_plan(half, plan))["eof"] == 2


def test_freeze_callback_takes_a_plan_dict():
    callback = SalfFreezeCallback(plan=FreezePlan.manual(1, 4, head="untied-copy").to_dict())
    assert isinstance(callback.plan, FreezePlan) and callback.plan.head == "untied-copy"
