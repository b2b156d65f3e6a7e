"""FreezePlan: validation, JSON round trip, description, model checks."""

from __future__ import annotations

import json

import pytest

from salf import __version__
from salf.errors import SalfError
from salf.plan import HEADS, SCHEMA, FreezePlan, check_cut, check_head

TIED = {"spec": "smollm2-135m", "name_or_path": "/cache/smollm2", "revision": None,
        "weights_hash": "abc123def4567890", "num_layers": 30, "model_type": "llama", "tied": True}


def _plan(**kw):
    base = dict(eof=22, num_layers=30, policy="max-gain", policy_params={"source": "depth"},
                reason="largest gain at layer 22", model=dict(TIED), data={"sample_hash": "ff00"},
                predicted={"flops_ratio": 0.51, "memory_ratio": 0.36, "step_time_ratio": 0.43, "benefit": 0.1},
                trace_file="runs/x/trace.json")
    base.update(kw)
    return FreezePlan(**base)


def test_json_round_trip(tmp_path):
    plan = _plan()
    path = plan.to_json(tmp_path / "sub" / "plan.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    assert list(data)[1:] == ["eof", "num_layers", "head", "train_embeddings", "policy", "policy_params",
                              "reason", "model", "data", "predicted", "trace_file", "layers", "salf_version",
                              "created"]
    again = FreezePlan.from_json(path)
    assert again == plan
    assert FreezePlan.from_dict(plan.to_dict()) == plan
    assert again.salf_version == __version__ and again.created


def test_layers_and_description():
    plan = _plan()
    assert plan.frozen_layers() == list(range(22))
    assert plan.trainable_layers() == list(range(22, 30))
    assert plan.describe() == "freeze embeddings + layers 1-22 of 30, train 23-30, head frozen (tied)"
    zero = FreezePlan.manual(0, 30, model={"tied": False})
    assert zero.frozen_layers() == [] and zero.trainable_layers() == list(range(30))
    assert zero.describe() == "freeze embeddings, train layers 1-30 of 30, head frozen (untied)"
    one = FreezePlan.manual(1, 4)
    assert one.describe() == "freeze embeddings + layer 1 of 4, train 2-4, head frozen"
    top = FreezePlan.manual(3, 4, head="untied-copy", model={"tied": True})
    assert top.describe() == "freeze embeddings + layers 1-3 of 4, train 4, head trained as an untied copy"
    assert "only an untied copy of the head" in FreezePlan.manual(4, 4, head="untied-copy").describe()


def test_full_and_manual():
    full = FreezePlan.full(30, model=dict(TIED))
    assert full.is_full and full.train_embeddings and full.head == "trainable" and full.eof == 0
    assert full.frozen_layers() == [] and full.trainable_layers() == list(range(30))
    assert full.describe().startswith("full fine-tuning")
    manual = FreezePlan.manual(15, 30)
    assert manual.policy == "manual" and manual.policy_params == {"freeze_below": 15}
    assert not manual.is_full and manual.head == "frozen"


@pytest.mark.parametrize("kw,match", [
    (dict(eof=31), r"\[0, 30\]"),
    (dict(eof=-1), r"\[0, 30\]"),
    (dict(eof=2.5), "integer"),
    (dict(eof=True), "integer"),
    (dict(num_layers=0, model={}), "num_layers"),
    (dict(head="half"), "head must be"),
    (dict(head="trainable"), "untied-copy"),                 # tied embeddings
    (dict(eof=30), "nothing"),                               # everything frozen
    (dict(train_embeddings=True), "full fine-tuning"),      # train_embeddings only for full FT
    (dict(model=dict(TIED, num_layers=16)), "disagrees"),
    (dict(predicted=[1]), "predicted"),
])
def test_invalid_plans_raise(kw, match):
    with pytest.raises(SalfError, match=match):
        _plan(**kw)


@pytest.mark.parametrize("args,kw,match", [
    ((31, 30), {}, r"\[0, 30\]"),
    ((30, 30), {}, "nothing"),
    ((3, 30, "half"), {}, "head must be one of frozen, trainable, untied-copy"),
    ((3, 30, "trainable", True), {}, "untied-copy"),
    ((3, 30), dict(train_embeddings=True), "full fine-tuning"),
    ((3, 30), dict(layers=[4, 5]), "lowest trainable layer"),
    ((3, 30), dict(layers=[3, 30]), "layers must be"),
])
def test_check_cut_is_the_plans_rules(args, kw, match):
    with pytest.raises(SalfError, match=f"^salf-test: .*{match}"):
        check_cut(*args, context="salf-test", **kw)
    with pytest.raises(SalfError, match=f"^freeze plan: .*{match}"):   # the same rules, in the plan
        FreezePlan(*args[:2], *args[2:3], model={"tied": args[3]} if len(args) > 3 else {}, **kw)


def test_check_cut_accepts_consistent_cuts():
    check_cut(30, 30, "untied-copy", tied=True)
    check_cut(30, 30, "trainable", tied=False)
    check_cut(3, 30, "trainable")                       # tied unknown: checked later
    check_cut(0, 30, "trainable", tied=True, train_embeddings=True)   # full fine-tuning
    check_cut(3, 30, layers=[3, 7])
    for head in HEADS:
        check_head(head, tied=False)


def test_head_options_at_the_top():
    assert FreezePlan.manual(30, 30, head="untied-copy", model={"tied": True}).trainable_layers() == []
    assert FreezePlan.manual(30, 30, head="trainable", model={"tied": False}).head == "trainable"
    # tied-ness unknown at construction: caught when checked against the model
    plan = FreezePlan.manual(10, 30, head="trainable")
    with pytest.raises(SalfError, match="untied-copy"):
        plan.check_model({"tied": True, "weights_hash": None}, 30)


def test_check_model():
    plan = _plan()
    plan.check_model(dict(TIED), 30)                                  # same model: fine
    plan.check_model({"name_or_path": "x"}, 30)                       # no hash to compare: fine
    with pytest.raises(SalfError, match="num_layers differs.*30.*16"):
        plan.check_model(dict(TIED), 16)
    other = dict(TIED, weights_hash="ffffeeee0000", name_or_path="/cache/smollm2-instruct")
    with pytest.raises(SalfError, match="weights_hash differs.*allow-different-weights"):
        plan.check_model(other, 30)
    plan.check_model(other, 30, allow_different_weights=True)
    with pytest.raises(SalfError, match="num_layers"):           # never overridable
        plan.check_model(other, 29, allow_different_weights=True)


def test_check_model_accepts_dataclass_info():
    from dataclasses import dataclass

    @dataclass
    class Info:
        spec: str
        name_or_path: str
        revision: str | None
        weights_hash: str

    plan = _plan()
    plan.check_model(Info("smollm2-135m", "/cache/smollm2", None, TIED["weights_hash"]), 30)
    with pytest.raises(SalfError, match="weights_hash"):
        plan.check_model(Info("smollm2-135m", "/cache/smollm2", None, "0" * 16), 30)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "not a salf freeze plan"),
    ('{"schema": "salf.trace/1", "eof": 3, "num_layers": 4}', "schema"),
    ('{"spaces": [], "num_layers": 30}', "missing eof"),
    ('{"eof": 3, "num_layers": 4, "colour": "red"}', "unknown key"),
    ('{"eof": "three", "num_layers": 4}', "eof must be"),
    ('{"eof": 3, "num_layers": 4, "model": 7}', "model must be"),
])
def test_from_json_rejects_malformed_files(tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(SalfError, match=match) as info:
        FreezePlan.from_json(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(SalfError, match="not found"):
        FreezePlan.from_json(tmp_path / "nope.json")


def test_prediction_from_cost_model_fits_in_plan(tmp_path):
    import transformers

    from salf.cost import ModelShape, StepSettings, cost_curve, plan_prediction

    shape = ModelShape.from_config(transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True))
    entry = cost_curve(shape, StepSettings(128, 8, loss_positions="last", machine="cpu"))[22]
    plan = FreezePlan.manual(22, 30, model={"tied": shape.tied}, predicted=plan_prediction(entry))
    again = FreezePlan.from_json(plan.to_json(tmp_path / "p.json"))
    assert again.predicted["flops_ratio"] == pytest.approx(entry["flops_ratio"])


def test_non_contiguous_trainable_set():
    plan = FreezePlan.manual(3, 8, layers=[3, 5, 7])
    assert plan.trainable_layers() == [3, 5, 7]
    assert "train only layers 4, 6, 8" in plan.describe()
    assert FreezePlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(SalfError, match="lowest trainable layer"):
        FreezePlan.manual(2, 8, layers=[3, 5])
    with pytest.raises(SalfError, match="layers must be"):
        FreezePlan.manual(3, 8, layers=[3, 9])
