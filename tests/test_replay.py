"""salf.models.replay on tiny models: capturing a layer's output, stopping after it, and
replaying layers 1..k from a stored output, alone and nested."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from salf.models.anatomy import anatomy
from salf.models.replay import (LayerOutput, PrefixReplay, StopForward, capture_output,
                                replay_stored, run_to_layer)
from salf.models.tiny import tiny_model

FAMILIES = ["llama", "gpt2", "opt", "falcon"]   # falcon's layers return a tuple


def _inputs(seed: int = 0, pad: bool = True) -> dict:
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :3] = 0                     # left padding on one row
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def _counting(modules) -> tuple[list[int], list]:
    """A forward-call counter per module and the hook handles."""
    calls = [0] * len(modules)

    def hook(i):
        return lambda *_: calls.__setitem__(i, calls[i] + 1)

    return calls, [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]


def _class_forward(layer: nn.Module) -> bool:
    return "forward" not in layer.__dict__ and layer.forward.__func__ is type(layer).forward


@pytest.mark.parametrize("family", FAMILIES)
def test_a_captured_output_is_the_models_hidden_state(family):
    model = tiny_model(family)
    anat = anatomy(model)
    with torch.no_grad():
        reference = model(**_inputs(), output_hidden_states=True).hidden_states
        for k in range(1, anat.num_layers):       # hidden_states[L] is after the final norm
            hooks = dict(anat.layers[k - 1]._forward_hooks)    # transformers' own, if any
            with capture_output(anat.layers[k - 1]) as out:
                model(**_inputs())
            assert isinstance(out, LayerOutput) and isinstance(out.as_tuple, bool)
            assert torch.equal(out.hidden, reference[k]), k
            assert dict(anat.layers[k - 1]._forward_hooks) == hooks  # ours is gone


@pytest.mark.parametrize("family", FAMILIES)
def test_running_to_layer_k_stops_there(family):
    model = tiny_model(family)
    anat = anatomy(model)
    calls, handles = _counting([*anat.layers, anat.head])
    try:
        with torch.no_grad():
            reference = model(**_inputs(), output_hidden_states=True).hidden_states
            calls[:] = [0] * len(calls)
            out = run_to_layer(model, anat.layers[1], _inputs())
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1, 0, 0, 0]          # layers 1-2 ran, layers 3-4 and the head did not
    assert torch.equal(out.hidden, reference[2])
    with pytest.raises(StopForward), torch.no_grad(), capture_output(anat.layers[0], stop=True):
        model(**_inputs())                   # a stopping capture outside run_to_layer raises
    assert run_to_layer(model, nn.Linear(2, 2), _inputs()).hidden is None   # never ran


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 3])
def test_a_replay_of_layers_1_to_k_gives_the_full_forwards_logits(family, k):
    model = tiny_model(family)
    anat = anatomy(model)
    with torch.no_grad():
        with capture_output(anat.layers[k - 1], clone=True) as stored:
            full = model(**_inputs()).logits
        calls, handles = _counting([next(layer.children()) for layer in anat.layers])  # a part of each
        try:
            with replay_stored(anat.layers, k, stored):
                replayed = model(**_inputs()).logits
                # other tokens of the same layout: the prefix is not run, its output is replayed
                other = model(**{**_inputs(seed=1), "attention_mask": _inputs()["attention_mask"]}).logits
        finally:
            for h in handles:
                h.remove()
    assert calls == [0] * k + [2] * (anat.num_layers - k)   # layers 1..k never computed
    assert torch.equal(replayed, full)
    assert torch.equal(other, full)
    assert all(_class_forward(layer) for layer in anat.layers)


def test_nested_patches_restore_in_order():
    """An outer long-lived patch (the prefix cache's, active only while a batch is set) and
    an inner block replay (the probe's): the inner exit gives the outer one back, the outer
    detach the class's forward."""
    model = tiny_model("llama")
    anat = anatomy(model)
    with torch.no_grad():
        with capture_output(anat.layers[1], clone=True) as h2, \
                capture_output(anat.layers[2], clone=True) as h3:
            full = model(**_inputs()).logits
        active = [False]
        outer = PrefixReplay(anat.layers, 3, replay_stored(anat.layers, 3, h3).replay,
                             as_tuple=lambda: h3.as_tuple, active=lambda: active[0]).attach()
        patched = [layer.__dict__["forward"] for layer in anat.layers[:3]]
        with pytest.raises(RuntimeError, match="already attached"):
            outer.attach()
        assert torch.equal(model(**_inputs()).logits, full)         # inactive: the real layers
        with replay_stored(anat.layers, 2, h2) as inner:
            assert inner.attached
            assert [layer.__dict__["forward"] for layer in anat.layers[:2]] != patched[:2]
            assert anat.layers[2].__dict__["forward"] is patched[2]  # beyond the inner cut
            assert torch.equal(model(**_inputs()).logits, full)     # layer 3 runs under the outer
        assert [layer.__dict__["forward"] for layer in anat.layers[:3]] == patched
        active[0] = True
        assert torch.equal(model(**_inputs()).logits, full)         # the outer replays h^3
        outer.detach()
        outer.detach()                                              # a second detach: nothing
    assert not outer.attached
    assert all(_class_forward(layer) for layer in anat.layers)
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).logits, full)
