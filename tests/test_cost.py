"""Cost model: matmul FLOPs against torch's FlopCounterMode, activations against the
tensors autograd really saves, shape/ratio invariants, and the documented comparison
with the step-time ratios measured in /work/shared/DATA.md."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from salf.cost import (MACHINES, Machine, ModelShape, activation_bytes_per_token, cost_curve, cost_table,
                       full_cost, get_machine, plan_prediction, predicted_step_time_ratio)
from salf.errors import SalfError
from salf.models.tiny import TINY_FAMILIES, tiny_model

B, T = 2, 32


def _tiny_llama(**overrides):
    """The tiny llama of salf.models.tiny, widened so matmuls dominate, eager attention
    (FlopCounterMode does not count CPU flash attention, it does count eager's bmm)."""
    cls_name, kwargs = TINY_FAMILIES["llama"]
    kwargs = dict(kwargs, hidden_size=128, intermediate_size=384, attn_implementation="eager",
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs))


def _freeze(model, k: int | None):
    """k=None: everything trainable; else embeddings + first k layers frozen."""
    for p in model.parameters():
        p.requires_grad_(True)
    if k is None:
        return
    model.model.embed_tokens.weight.requires_grad_(False)
    for layer in model.model.layers[:k]:
        for p in layer.parameters():
            p.requires_grad_(False)


def _measured_flops(model, ids, loss_positions):
    with FlopCounterMode(display=False) as counter:
        if loss_positions == "all":
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:   # classification: logits at the label position only
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 0])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))


def _smollm2_shape():
    return ModelShape.from_config(transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True))


def _llama1b_shape():
    return ModelShape.from_config(transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True))


# --------------------------------------------------------------------------------------
# FLOPs vs an independent count

@pytest.mark.parametrize("loss_positions", ["all", "last"])
def test_matmul_flops_match_flop_counter(llama, ids, loss_positions):
    shape = ModelShape.from_model(llama)
    curve = cost_curve(shape, T, B, loss_positions=loss_positions, attention="eager", machine="cpu",
                       include_full=True)
    for k in [None, 0, 1, 2, 3, 4]:
        _freeze(llama, k)
        measured = _measured_flops(llama, ids, loss_positions)
        predicted = curve[-1 if k is None else k]["matmul_flops"]
        assert predicted == pytest.approx(measured, rel=0.05), (k, predicted, measured)


@pytest.mark.parametrize("layers", [[0, 3], [1, 2], [0, 2, 3]])
def test_layer_set_flops_match_flop_counter(llama, ids, layers):
    """Spectrum-style sets: frozen layers between trained ones cost input-gradients only."""
    from salf.cost import layer_set_cost

    shape = ModelShape.from_model(llama)
    _freeze(llama, 0)
    for i, layer in enumerate(llama.model.layers):
        for p in layer.parameters():
            p.requires_grad_(i in layers)
    measured = _measured_flops(llama, ids, "last")
    predicted = layer_set_cost(shape, layers, T, B, loss_positions="last", attention="eager",
                               machine="cpu")["matmul_flops"]
    assert predicted == pytest.approx(measured, rel=0.05), (layers, predicted, measured)


def test_untied_copy_head_flops(ids):
    """A trainable (untied) head adds exactly its weight-gradient matmul."""
    model = _tiny_llama(tie_word_embeddings=False)
    shape = ModelShape.from_model(model)
    assert not shape.tied
    curve = cost_curve(shape, T, B, head="trainable", attention="eager", machine="cpu")
    _freeze(model, 2)
    model.lm_head.weight.requires_grad_(True)
    assert curve[2]["matmul_flops"] == pytest.approx(_measured_flops(model, ids, "all"), rel=0.05)
    frozen = cost_curve(shape, T, B, head="frozen", attention="eager", machine="cpu")
    assert curve[2]["matmul_flops"] - frozen[2]["matmul_flops"] == 2 * shape.hidden_size * shape.vocab_size * B * T


@pytest.mark.filterwarnings("ignore::FutureWarning")     # PEFT calls a deprecated transformers API
def test_lora_flops_match_flop_counter(ids):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for k in (0, 3):
        model = _tiny_llama()
        shape = ModelShape.from_model(model)
        config = peft.LoraConfig(r=8, target_modules=targets, layers_to_transform=list(range(k, 4)),
                                 lora_dropout=0.0)
        wrapped = peft.get_peft_model(model, config)
        curve = cost_curve(shape, T, B, lora_rank=8, attention="eager", machine="cpu")
        assert curve[k]["trainable_params"] == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        with FlopCounterMode(display=False) as counter:
            wrapped(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        assert curve[k]["matmul_flops"] == pytest.approx(counter.get_total_flops(), rel=0.05), k


def test_gradient_checkpointing_flops_match_flop_counter(ids):
    model = _tiny_llama().train()
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:      # transformers >= 5
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()     # as a plan applies it: no input-requires-grad hook
    shape = ModelShape.from_model(model)
    curve = cost_curve(shape, T, B, gradient_checkpointing=True, attention="eager", machine="cpu")
    plain = cost_curve(shape, T, B, attention="eager", machine="cpu")
    for k in (0, 2):
        _freeze(model, k)
        for i, layer in enumerate(model.model.layers):      # checkpoint only trainable layers
            layer.gradient_checkpointing = i >= k
        assert curve[k]["matmul_flops"] == pytest.approx(_measured_flops(model, ids, "all"), rel=0.05)
        assert curve[k]["matmul_flops"] > plain[k]["matmul_flops"]
        assert curve[k]["memory_bytes"] < plain[k]["memory_bytes"]


# --------------------------------------------------------------------------------------
# Activations vs what autograd saves

def _saved_bytes(model, ids):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("attention,dtype", [("sdpa", torch.float32), ("eager", torch.float32),
                                             ("sdpa", torch.bfloat16)])
def test_activation_estimate_matches_saved_tensors(ids, attention, dtype):
    model = _tiny_llama(hidden_size=256, intermediate_size=768, attn_implementation=attention).to(dtype)
    shape = ModelShape.from_model(model)
    per_layer = []
    for k in (1, 2):
        _freeze(model, k)
        per_layer.append(_saved_bytes(model, ids))
    measured = (per_layer[0] - per_layer[1]) / (B * T)          # one trainable layer fewer
    predicted = activation_bytes_per_token(shape, T, dtype.itemsize, attention)
    assert predicted == pytest.approx(measured, rel=0.05)


# --------------------------------------------------------------------------------------
# Invariants

@pytest.mark.parametrize("machine", ["cpu", "h200"])
@pytest.mark.parametrize("shape_fn,seq,batch,loss", [(_smollm2_shape, 128, 8, "last"),
                                                     (_llama1b_shape, 1024, 8, "all")])
def test_cost_decreases_with_depth_of_cut(shape_fn, seq, batch, loss, machine):
    shape = shape_fn()
    curve = cost_curve(shape, seq, batch, loss_positions=loss, machine=machine, include_full=True)
    cuts, full = curve[:-1], curve[-1]
    assert len(cuts) == shape.num_layers + 1 and [e["eof"] for e in cuts] == list(range(shape.num_layers + 1))
    assert full["full"] and full["cut"] == "full" and full["flops"] == 1.0 and full["memory"] == 1.0
    assert full["trainable_params"] == shape.total_params
    for key in ("flops_abs", "matmul_flops", "memory_bytes", "step_time_s", "trainable_params"):
        values = [e[key] for e in cuts]
        assert all(a > b for a, b in zip(values, values[1:])), key
        assert full[key] > cuts[0][key], key
    assert cuts[-1]["valid"] is False and all(e["valid"] for e in cuts[:-1])
    assert all(0 < e["flops_ratio"] < 1 and 0 < e["memory_ratio"] < 1 and 0 < e["step_time_ratio"] < 1
               for e in cuts)


def test_full_minus_k0_is_the_embedding_work():
    """k=0 differs from full FT only by the embedding gradient, its optimizer update and
    (tied) the head's weight-gradient."""
    shape = _smollm2_shape()
    cpu = cost_curve(shape, 128, 8, loss_positions="last", machine="cpu", include_full=True)
    full, k0 = cpu[-1], cpu[0]
    V, d = shape.vocab_size, shape.hidden_size
    assert full["matmul_flops"] - k0["matmul_flops"] == 2 * d * V * 8     # head weight-grad, 8 positions
    assert full["trainable_params"] - k0["trainable_params"] == shape.embedding_params
    # on the CPU the embedding's V x d gradient and AdamW update cost real time ...
    assert k0["step_time_ratio"] < 0.95
    assert full["bytes_page_faulted"] > 0 and k0["bytes_page_faulted"] == 0
    # ... on a GPU, with a caching allocator and fused AdamW, much less
    gpu = cost_curve(shape, 128, 8, loss_positions="last", machine="h200", include_full=True)
    assert gpu[0]["step_time_ratio"] > k0["step_time_ratio"]


def test_loss_positions_and_heads():
    shape = _smollm2_shape()
    last = cost_curve(shape, 128, 8, loss_positions="last", machine="cpu")
    every = cost_curve(shape, 128, 8, loss_positions="all", machine="cpu")
    some = cost_curve(shape, 128, 8, loss_positions=16, machine="cpu")
    assert last[10]["matmul_flops"] < some[10]["matmul_flops"] < every[10]["matmul_flops"]
    assert last[10]["memory_bytes"] < every[10]["memory_bytes"]
    copy = cost_curve(shape, 128, 8, loss_positions="all", head="untied-copy", machine="cpu")
    V, d = shape.vocab_size, shape.hidden_size
    assert copy[10]["trainable_params"] - every[10]["trainable_params"] == V * d
    assert copy[10]["matmul_flops"] - every[10]["matmul_flops"] == 2 * d * V * 8 * 128
    assert copy[30]["valid"] and copy[30]["trainable_params"] == V * d + shape.final_norm_params
    with pytest.raises(SalfError, match="untied-copy"):
        cost_curve(shape, 128, 8, head="trainable")


def test_lora_and_checkpointing_memory():
    shape = _llama1b_shape()
    plain = cost_curve(shape, 1024, 8, dtype_bytes=2, machine="h200")
    lora = cost_curve(shape, 1024, 8, dtype_bytes=2, lora_rank=16, machine="h200")
    ckpt = cost_curve(shape, 1024, 8, dtype_bytes=2, gradient_checkpointing=True, machine="h200")
    for k in (0, 8):
        assert lora[k]["trainable_params"] < plain[k]["trainable_params"] / 50
        assert lora[k]["memory_bytes"] < plain[k]["memory_bytes"]
        assert lora[k]["matmul_flops"] < plain[k]["matmul_flops"]         # no base weight-gradients
        assert ckpt[k]["memory_bytes"] < plain[k]["memory_bytes"]
        assert ckpt[k]["matmul_flops"] > plain[k]["matmul_flops"]
    assert lora[0]["trainable_params"] == 16 * 16 * sum(i + o for _, i, o in shape.linear_shapes)


# --------------------------------------------------------------------------------------
# Shapes

@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_shape_from_model_counts_every_parameter(family):
    model = tiny_model(family)
    shape = ModelShape.from_model(model)
    assert shape.source == "model"
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.num_layers == len(shape.layer_params) == 4
    assert 0 < shape.layer_matmul_params[0] <= shape.layer_params[0]
    assert shape.linear_shapes and all(i > 0 and o > 0 for _, i, o in shape.linear_shapes)
    assert sum(i * o for _, i, o in shape.linear_shapes) == shape.layer_matmul_params[0]
    approx = ModelShape.from_config(model.config)
    assert approx.total_params == pytest.approx(shape.total_params, rel=0.05)
    assert approx.layer_matmul_params == shape.layer_matmul_params
    assert approx.tied == shape.tied
    curve = cost_curve(shape, 16, 2, machine="cpu")
    assert len(curve) == 5 and curve[0]["flops"] < 1


def test_shape_from_config_matches_model_for_llama(llama):
    exact, approx = ModelShape.from_model(llama), ModelShape.from_config(llama.config)
    for key in ("layer_params", "layer_matmul_params", "embedding_params", "total_params", "num_heads",
                "num_kv_heads", "head_dim", "vocab_size", "tied", "intermediate_size"):
        assert getattr(exact, key) == getattr(approx, key), key


def test_shape_dict_round_trip(llama):
    shape = ModelShape.from_model(llama)
    again = ModelShape.from_dict(json.loads(json.dumps(shape.to_dict())))
    assert again == shape
    with pytest.raises(SalfError, match="missing"):
        ModelShape.from_dict({"num_layers": 4})
    with pytest.raises(SalfError):
        ModelShape.from_dict([1, 2])


def test_settings_are_checked():
    shape = _smollm2_shape()
    for bad in (dict(loss_positions="first"), dict(optimizer="lion"), dict(head="half"),
                dict(lora_rank=0), dict(dtype_bytes=3), dict(attention="flash2")):
        with pytest.raises(SalfError):
            cost_curve(shape, 128, 8, machine="cpu", **bad)
    with pytest.raises(SalfError):
        cost_curve(shape, 0, 8)
    with pytest.raises(SalfError, match="unknown machine"):
        get_machine("tpu")


def test_step_settings_are_checked_once():
    from salf.cost import StepSettings
    from salf.plan import HEADS

    shape = _smollm2_shape()
    given = StepSettings(128, 8, loss_positions=16, lora_rank=4, lora_targets=["q_proj", "v_proj"],
                         machine="cpu")
    s = given.check(shape)
    assert (s.tokens, s.loss_tokens, s.machine) == (8 * 128, 8 * 16, MACHINES["cpu"])
    assert [name for name, _, _ in s.lora_targets] == ["q_proj", "v_proj"]
    assert (given.lora_targets, given.machine) == (("q_proj", "v_proj"), "cpu")    # as given
    assert s.check(shape) == s                   # checking the checked copy changes nothing
    with pytest.raises(AttributeError):          # frozen: every cut of a curve sees the same settings
        s.head = "untied-copy"
    with pytest.raises(SalfError, match="no LoRA target"):
        cost_curve(shape, 128, 8, lora_rank=4, lora_targets=["wq"], machine="cpu")
    # the head options are the plan's: every one is costed, anything else is refused by its list
    untied = ModelShape.from_dict(dict(shape.to_dict(), tied=False, total_params=0))
    assert [cost_curve(untied, 128, 8, head=h, machine="cpu")[30]["valid"] for h in HEADS] == [False, True, True]
    with pytest.raises(SalfError, match=f"cost model: head must be one of {', '.join(HEADS)}"):
        cost_curve(untied, 128, 8, head="half", machine="cpu")


@pytest.mark.parametrize("bad", [dict(seq_len=0), dict(batch_size=-1), dict(loss_positions="first"),
                                 dict(optimizer="lion"), dict(dtype_bytes=3), dict(head="half"),
                                 dict(lora_rank=0), dict(attention="flash2")])
def test_a_bad_step_setting_is_refused_when_made_and_named(bad):
    from salf.cost import StepSettings

    (field, value), = bad.items()
    with pytest.raises(SalfError, match=f"^cost model: .*{field}.*{value!r}"):
        StepSettings(**dict(dict(seq_len=128, batch_size=8), **bad))


def test_step_settings_that_depend_on_the_model_are_refused_by_check():
    from salf.cost import StepSettings

    shape = _smollm2_shape()     # tied
    for bad, match in ((dict(head="trainable"), "head 'trainable' is impossible with tied"),
                       (dict(lora_rank=4, lora_targets=["wq"]), "no LoRA target among"),
                       (dict(machine="tpu"), "unknown machine 'tpu'")):
        step = StepSettings(128, 8, **bad)
        with pytest.raises(SalfError, match=match):
            step.check(shape)
        with pytest.raises(SalfError, match=match):
            cost_curve(shape, step)


def test_the_settings_object_is_one_form_of_the_arguments():
    """StepSettings, or its fields as cost_curve's loose arguments (older code): same numbers,
    on the settings the tests of this file cover; mixing the two forms is refused."""
    from salf.cost import StepSettings, layer_set_cost

    smol, big = _smollm2_shape(), _llama1b_shape()
    cases = [(smol, 128, 8, dict(loss_positions=lp, machine="cpu")) for lp in ("last", "all", 16)]
    cases += [(smol, 128, 8, dict(head="untied-copy", machine="cpu")),
              (smol, 128, 8, dict(lora_rank=4, lora_targets=["q_proj", "v_proj"], machine="cpu")),
              (smol, 32, 2, dict(attention="eager", gradient_checkpointing=True, machine="cpu")),
              (smol, 128, 8, dict(loss_positions="last", machine=Machine("ideal", 1e12, float("inf")))),
              (big, 1024, 8, dict(dtype_bytes=2, machine="h200")),
              (big, 1024, 8, dict(dtype_bytes=2, lora_rank=16, machine="h200")),
              (big, 1024, 8, dict(dtype_bytes=2, gradient_checkpointing=True, machine="h200"))]
    for shape, seq, batch, kw in cases:
        step = StepSettings(seq, batch, **kw)
        assert cost_curve(shape, step, include_full=True) == cost_curve(shape, seq, batch, include_full=True, **kw)
        assert cost_curve(shape, step) == cost_curve(shape, seq_len=seq, batch_size=batch, **kw)
        assert layer_set_cost(shape, [0, 5], step) == layer_set_cost(shape, [0, 5], seq, batch, **kw)
        assert full_cost(shape, seq, batch, **kw) == cost_curve(shape, step, include_full=True)[-1]
    step = StepSettings(128, 8)
    for mixed in (lambda: cost_curve(smol, step, 8), lambda: cost_curve(smol, step, head="frozen"),
                  lambda: cost_curve(smol, 128, 8, seq_len=128), lambda: cost_curve(smol, 128, 8, heads="x")):
        with pytest.raises(TypeError):
            mixed()


def test_table_and_plan_prediction_are_json_ready():
    shape = _smollm2_shape()
    table = cost_table(shape, 128, 8, loss_positions="last", machine="cpu")
    text = json.dumps(table)
    assert len(table["cuts"]) == 31 and table["full"]["full"] and table["settings"]["machine"]["name"] == "cpu"
    assert json.loads(text)["shape"]["vocab_size"] == 49152
    pred = plan_prediction(table["cuts"][22])
    assert set(pred) >= {"flops_ratio", "memory_ratio", "step_time_ratio", "trainable_params"}
    assert full_cost(shape, 128, 8, loss_positions="last", machine="cpu")["full"]
    entry, full = table["cuts"][22], table["full"]
    assert predicted_step_time_ratio(entry, full) == pytest.approx(entry["step_time_ratio"])


def test_step_time_reduces_to_flops_on_a_compute_only_machine():
    shape = _smollm2_shape()
    ideal = Machine("ideal", 1e12, float("inf"))
    curve = cost_curve(shape, 128, 8, loss_positions="last", machine=ideal)
    for e in curve:
        assert e["step_time_ratio"] == pytest.approx(e["matmul_flops_ratio"])


# --------------------------------------------------------------------------------------
# Against the measurements of DATA.md (the comparison table of docs/cost-model.md)

def test_predictions_track_measured_step_time_ratios():
    smol = cost_curve(_smollm2_shape(), 128, 8, loss_positions="last", machine="cpu")
    for k, measured in {15: 0.54, 22: 0.42, 26: 0.36, 29: 0.28}.items():
        assert smol[k]["step_time_ratio"] == pytest.approx(measured, abs=0.05), k
        assert smol[k]["step_time_ratio"] < smol[k]["flops_ratio"]     # beyond the FLOPs ratio
    big = cost_curve(_llama1b_shape(), 1024, 8, loss_positions="all", dtype_bytes=2, machine="h200",
                     include_full=True)
    for k, measured in {4: 0.82, 8: 0.68, 12: 0.55, 15: 0.44}.items():
        assert big[k]["step_time_ratio"] == pytest.approx(measured, abs=0.03), k
    gib = {4: 28.8, 8: 24.5, 12: 20.3, 15: 17.2}
    for k, measured in gib.items():
        assert big[k]["memory_bytes"] / 2**30 == pytest.approx(measured, rel=0.08), k
    assert big[-1]["memory_bytes"] / 2**30 == pytest.approx(34.1, rel=0.08)


def test_machine_presets():
    assert get_machine("gpu") is MACHINES["h100"]
    assert get_machine(MACHINES["cpu"].to_dict()) == MACHINES["cpu"]
    assert get_machine("auto").name in MACHINES


def test_a_layer_set_pays_for_its_layers_and_the_path_down_to_its_lowest():
    """Training layers {0, 3} of 4: forward everything, input-gradients through 1-2 (frozen),
    weight gradients and optimizer state for 0 and 3 only. A prefix given as a set costs
    exactly its cut."""
    from salf.cost import ModelShape, cost_curve, layer_set_cost
    from salf.errors import SalfError
    from salf.models import load_model

    shape = ModelShape.from_model(load_model("tiny-llama")[0])
    L = shape.num_layers
    curve = cost_curve(shape, 32, 4)
    for k in range(L):
        e = layer_set_cost(shape, range(k, L), 32, 4)
        assert e["flops_abs"] == curve[k]["flops_abs"] and e["memory_bytes"] == curve[k]["memory_bytes"]
    hole = layer_set_cost(shape, [0, L - 1], 32, 4)
    # cheaper than training every layer from 0, dearer than training the top layer alone
    assert curve[L - 1]["flops_abs"] < hole["flops_abs"] < curve[0]["flops_abs"]
    assert hole["trainable_params"] == (curve[0]["trainable_params"] - curve[1]["trainable_params"]
                                        + curve[L - 1]["trainable_params"])
    # the frozen middle layers keep their activations for the backward: same as the cut 0
    assert hole["memory_breakdown"]["activations"] == curve[0]["memory_breakdown"]["activations"]
    assert hole["layers"] == [0, L - 1] and 0 < hole["flops_ratio"] < 1
    with pytest.raises(SalfError, match="non-empty set"):
        layer_set_cost(shape, [L], 32, 4)
