import pytest
import torch
from torch import nn

from salf.errors import SalfError
from salf.models import TINY_FAMILIES, anatomy, layer_output, tiny_model, verify_anatomy


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_logits_from_anatomy_parts_match_model(family):
    model = tiny_model(family)
    anat = anatomy(model)
    assert anat.num_layers == 4
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    captured = {}
    anat.layers[0].register_forward_pre_hook(
        lambda m, a, kw: captured.__setitem__("h0", (a[0] if a else kw["hidden_states"])),
        with_kwargs=True)
    anat.layers[-1].register_forward_hook(lambda m, a, o: captured.__setitem__("hL", layer_output(o)))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # every position, not just the last: W·N(h_L) (+bias, softcap) == model logits
    ours = anat.logits_from_normed(anat.normalize(captured["hL"]))
    torch.testing.assert_close(ours, out.logits, rtol=1e-4, atol=1e-4)
    # space 0 is the input of layer 1 == the model's first hidden state
    torch.testing.assert_close(captured["h0"], out.hidden_states[0])
    assert verify_anatomy(anat, ids) < 1e-4


def test_tied_flags():
    assert anatomy(tiny_model("llama")).tied
    assert not anatomy(tiny_model("mistral")).tied
    assert anatomy(tiny_model("gemma2")).logit_softcap == 30.0


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"model_type": "weird", "num_hidden_layers": 2})()
        self.body = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        self.out = nn.Linear(4, 10)

    def get_output_embeddings(self):
        return self.out


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(SalfError, match=r"unsupported architecture _NoLayers .*decoder layers"):
        anatomy(_NoLayers())


def test_verify_anatomy_catches_a_wrong_part():
    model = tiny_model("llama")
    anat = anatomy(model)
    anat.final_norm = nn.Identity()  # a resolution that 'looks' right but computes wrong logits
    with pytest.raises(SalfError, match="anatomy check failed"):
        verify_anatomy(anat, torch.randint(0, 500, (1, 8)))
