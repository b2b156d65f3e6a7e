import json
import re

import pytest

from salf.errors import SalfError
from salf.export import export_plan
from salf.models import tiny_model
from salf.plan import FreezePlan


def _plan(**kw):
    return FreezePlan.manual(2, 4, model={"model_type": "llama", "num_layers": 4}, **kw)


def test_axolotl_regexes_match_exactly_the_trainable_parameters():
    plan = _plan(head="untied-copy")
    text = export_plan(plan, "axolotl")
    patterns = [re.compile(line[2:]) for line in text.splitlines() if line.startswith("- ")]
    names = [n for n, _ in tiny_model("llama").named_parameters(remove_duplicate=False)]
    matched = {n for n in names if any(p.match(n) for p in patterns)}
    expected = {n for n in names if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm."))}
    expected.add("lm_head.weight")  # the untied copy
    assert matched == expected


def test_llama_factory_and_peft():
    plan = _plan()
    assert "freeze_trainable_layers: 2" in export_plan(plan, "llama-factory")
    cfg = json.loads(export_plan(plan, "peft"))
    assert cfg["layers_to_transform"] == [2, 3] and cfg["layers_pattern"] == "layers"
    with pytest.raises(SalfError, match="non-contiguous"):
        export_plan(FreezePlan.manual(1, 4, layers=[1, 3], model={"model_type": "llama"}),
                    "llama-factory")
    with pytest.raises(SalfError, match="layer path"):
        export_plan(FreezePlan.manual(1, 4, model={"model_type": "weird"}), "axolotl")
