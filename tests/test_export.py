"""`salf export` checked against how each target library reads what it writes.

Every format is applied to tiny models of each family and must make trainable exactly what
salf's own `apply_plan` does (less the parts a format cannot name, which it must say):

- PEFT (pinned, always here): `peft.LoraConfig(**json)` + `peft.get_peft_model`, the real thing.
- Axolotl, LLaMA-Factory (not installable next to salf's pins: they require other
  transformers/peft versions): the default suite applies their documented semantics, copied
  below with the version and source named; the `*_real_*` tests check the same fragments
  against the libraries' own code and classes when they are importable, e.g. after
  `pip install --no-deps axolotl==0.19.0 llamafactory==0.9.5` (they skip otherwise).
See docs/interop.md.
"""

import dataclasses
import importlib.util
import json
import re
import sys
import typing
from pathlib import Path

import pytest
import yaml
from torch import nn
from transformers.pytorch_utils import Conv1D

from salf.cli import main
from salf.errors import SalfError
from salf.export import export_plan
from salf.models import tiny_model
from salf.models.anatomy import anatomy
from salf.models.tiny import TINY_FAMILIES
from salf.plan import FreezePlan
from salf.train.freeze import LoraSettings, apply_plan

# LLaMA-Factory 0.9.5, src/llamafactory/hparams/finetuning_args.py (FreezeArguments and
# FinetuningArguments.finetuning_type): the keys salf writes and their types / choices.
LLAMA_FACTORY_KEYS = {"finetuning_type": ("lora", "oft", "freeze", "full"),
                      "freeze_trainable_layers": int, "freeze_trainable_modules": str,
                      "freeze_extra_modules": str}


def _tiny(family):
    model = tiny_model(family)
    return model, anatomy(model)


def _plan(family, head="frozen", eof=2, layers=None):
    model, anat = _tiny(family)
    info = {"model_type": model.config.model_type, "num_layers": anat.num_layers, "tied": anat.tied}
    return FreezePlan.manual(eof, anat.num_layers, head=head, layers=layers, model=info)


def _cases():
    """(family, head): every tiny family with a frozen head and with its trainable head."""
    for family in TINY_FAMILIES:
        yield family, "frozen"
        yield family, "untied-copy" if anatomy(tiny_model(family)).tied else "trainable"


CASES = list(_cases())


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _salf_trains(family, plan, lora=None):
    """What salf itself trains for this plan (the reference every format is held to)."""
    return _trainable(apply_plan(tiny_model(family), plan, lora=lora))


def _part(names, prefix):
    return {n for n in names if n.startswith(prefix)}


def _final_norm(anat):
    """Parameter-name prefix of the final norm (what salf trains above the layers)."""
    return next(n for n, m in anat.model.named_modules() if m is anat.final_norm) + "."


# --------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("family,head", CASES)
def test_peft_config_is_a_lora_config_that_adapts_exactly_the_plans_layers(family, head):
    peft = pytest.importorskip("peft")
    plan = _plan(family, head)
    cfg = json.loads(export_plan(plan, "peft"))
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(cfg) <= fields, f"keys LoraConfig does not have: {set(cfg) - fields}"
    model, anat = _tiny(family)
    linear = {f"{anat.layers_path}.{i}.{name}" for i in plan.trainable_layers()
              for name, module in anat.layers[i].named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**cfg))

    # an adapter on every linear projection of the plan's layers, and nowhere else
    assert {n.removeprefix("base_model.model.").split(".lora_A.")[0]
            for n, _ in wrapped.named_parameters() if ".lora_A." in n} == linear
    # the same trainable tensors as salf's own --lora (adapters + the head's copy)
    assert _trainable(wrapped) == _salf_trains(family, plan, LoraSettings())
    assert any("modules_to_save" in n for n in _trainable(wrapped)) == (head != "frozen")


def test_peft_non_contiguous_layers_and_plans_it_cannot_express():
    peft = pytest.importorskip("peft")
    plan = FreezePlan.manual(1, 4, layers=[1, 3], model={"model_type": "llama", "num_layers": 4})
    wrapped = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**json.loads(
        export_plan(plan, "peft"))))
    assert {int(n.split(".")[4]) for n, _ in wrapped.named_parameters() if "lora_A" in n} == {1, 3}
    # no layer to adapt: PEFT would read layers_to_transform [] as "every layer"
    with pytest.raises(SalfError, match="no decoder layer"):
        export_plan(_plan("llama", "untied-copy", eof=4), "peft")
    with pytest.raises(SalfError, match="linear projections"):
        export_plan(FreezePlan.manual(1, 4, model={"model_type": "weird"}), "peft", "model.layers")
    with pytest.raises(SalfError, match="full fine-tuning"):
        export_plan(FreezePlan.full(4, model={"model_type": "llama"}), "peft")


# --------------------------------------------------------------------------- Axolotl


def _axolotl_patterns(text):
    return yaml.safe_load(text)["unfrozen_parameters"]


def _axolotl_unfreezes(model, patterns):
    """Axolotl's documented rule (axolotl 0.19.0, utils/freeze.py, freeze_layers_except):
    each '.' in a pattern is a literal dot, and a pattern matches a parameter name from its
    start (re.match); every other parameter is frozen."""
    assert not any("+" in p or p.endswith("]") for p in patterns)  # no '.+' / range syntax
    regexes = [re.compile(p.replace(".", r"\.")) for p in patterns]
    return {n for n, _ in model.named_parameters() if any(r.match(n) for r in regexes)}


@pytest.mark.parametrize("family,head", CASES)
def test_axolotl_patterns_unfreeze_exactly_what_salf_trains(family, head):
    plan = _plan(family, head)
    text = export_plan(plan, "axolotl")
    model, anat = _tiny(family)
    expected = _salf_trains(family, plan)
    if anat.tied and head == "untied-copy":  # the copy does not exist in the model Axolotl loads
        assert "untied copy of the tied head" in text
        expected -= _part(expected, "lm_head.")
    assert _axolotl_unfreezes(model, _axolotl_patterns(text)) == expected
    # the documented dialect, not a plain regex: as one, '^model.layers.2.' would match layer 20
    assert "\\" not in text


def test_axolotl_layer_sets_and_errors():
    plan = FreezePlan.manual(1, 12, layers=[1, 2, 11], model={"model_type": "llama"})
    patterns = _axolotl_patterns(export_plan(plan, "axolotl"))
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)] + ["model.norm.weight"]
    regexes = [re.compile(p.replace(".", r"\.")) for p in patterns]
    assert [n for n in names if any(r.match(n) for r in regexes)] == [
        "model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight",
        "model.layers.11.mlp.up_proj.weight", "model.norm.weight"]
    with pytest.raises(SalfError, match="layer path"):
        export_plan(FreezePlan.manual(1, 4, model={"model_type": "weird"}), "axolotl")
    custom = export_plan(FreezePlan.manual(1, 4, model={"model_type": "weird"}), "axolotl",
                         layers_path="backbone.blocks")
    assert "- ^backbone.blocks.3." in custom and "final norm also trains" in custom


@pytest.mark.parametrize("family,head", CASES)
def test_axolotl_real_freeze_layers_except(family, head):
    freeze = pytest.importorskip("axolotl.utils.freeze")
    plan = _plan(family, head)
    patterns = _axolotl_patterns(export_plan(plan, "axolotl"))
    model, _ = _tiny(family)
    expected = _axolotl_unfreezes(model, patterns)
    freeze.freeze_layers_except(model, patterns)
    assert _trainable(model) == expected


def test_axolotl_real_config_schema_takes_the_fragment():
    schema = pytest.importorskip("axolotl.utils.schemas.config")
    fragment = yaml.safe_load(export_plan(_plan("qwen2", "frozen"), "axolotl"))
    assert set(fragment) <= set(schema.AxolotlInputConfig.model_fields)
    cfg = schema.AxolotlInputConfig(
        base_model="HuggingFaceTB/SmolLM2-135M", micro_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=1e-5, num_epochs=1, datasets=[{"path": "tatsu-lab/alpaca", "type": "alpaca"}],
        **fragment)
    assert cfg.unfrozen_parameters == fragment["unfrozen_parameters"]


# --------------------------------------------------------------------------- LLaMA-Factory


def _split(value):
    """A comma-separated string (as written) or a list (as parsed) -> list."""
    if value is None:
        return []
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)


def _llama_factory_trains(model, cfg):
    """LLaMA-Factory's documented freeze mode (0.9.5, model/adapter.py, _setup_freeze_tuning):
    freeze_trainable_layers n > 0 trains the last n layers (n < 0 the first -n); a layer i
    trains the parameters whose names contain '.i.' (and the listed module, unless 'all');
    freeze_extra_modules are module names (the part before weight/bias) of parameters outside
    the layers, matched as substrings of every parameter name; a name not there is an error."""
    assert cfg["finetuning_type"] == "freeze" and _split(cfg["freeze_trainable_modules"]) == ["all"]
    n, num_layers = cfg["freeze_trainable_layers"], anatomy(model).num_layers
    ids = range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))
    names = [name for name, _ in model.named_parameters()]
    outside = {name.split(".")[-2] for name in names if not re.search(r"\.\d+\.", name)}
    extra = _split(cfg.get("freeze_extra_modules"))
    assert set(extra) <= outside, f"LLaMA-Factory: modules {set(extra) - outside} not found"
    keys = [f".{i}." for i in ids] + extra
    return {name for name in names if any(k in name for k in keys)}


def _llama_factory_config(text, model):
    cfg = yaml.safe_load(text)
    # LLaMA-Factory 0.9.5 runs transformers <= 5.6, where GPT-NeoX's head is embed_out;
    # the transformers salf pins names it lm_head
    if "embed_out" in str(cfg.get("freeze_extra_modules")) and not hasattr(model, "embed_out"):
        cfg["freeze_extra_modules"] = cfg["freeze_extra_modules"].replace("embed_out", "lm_head")
    return cfg


@pytest.mark.parametrize("family,head", CASES)
def test_llama_factory_freeze_mode_trains_what_salf_trains(family, head):
    plan = _plan(family, head)
    text = export_plan(plan, "llama-factory")
    cfg = yaml.safe_load(text)
    assert set(cfg) <= set(LLAMA_FACTORY_KEYS)
    assert cfg["finetuning_type"] in LLAMA_FACTORY_KEYS["finetuning_type"]
    assert all(isinstance(cfg[k], LLAMA_FACTORY_KEYS[k]) for k in cfg if k != "finetuning_type")
    model, anat = _tiny(family)
    expected = _salf_trains(family, plan)
    if "not trained here: the final norm" in text:
        norm = _final_norm(anat)
        short = norm.rstrip(".").rsplit(".", 1)[-1]  # what LLaMA-Factory would have to name
        layer_params = _part({n for n, _ in model.named_parameters()}, anat.layers_path + ".")
        assert any(short in n for n in layer_params), f"{short} could be named: name it"
        expected -= _part(expected, norm)
    if anat.tied and head == "untied-copy":
        assert "untied copy of the tied head" in text
        expected -= _part(expected, "lm_head.")
    assert _llama_factory_trains(model, _llama_factory_config(text, model)) == expected


def test_llama_factory_semantics_and_errors():
    model = tiny_model("llama")
    first_two = {"finetuning_type": "freeze", "freeze_trainable_layers": -2,
                 "freeze_trainable_modules": "all"}
    assert {n.split(".")[2] for n in _llama_factory_trains(model, first_two)} == {"0", "1"}
    only_head = yaml.safe_load(export_plan(_plan("mistral", "trainable", eof=4), "llama-factory"))
    assert only_head["freeze_trainable_layers"] == 0
    assert _llama_factory_trains(tiny_model("mistral"), only_head) == {"lm_head.weight"}
    with pytest.raises(SalfError, match="untied copy"):
        export_plan(_plan("llama", "untied-copy", eof=4), "llama-factory")
    with pytest.raises(SalfError, match="non-contiguous"):
        export_plan(FreezePlan.manual(1, 4, layers=[1, 3], model={"model_type": "llama"}),
                    "llama-factory")
    assert export_plan(FreezePlan.full(4), "llama-factory") == "finetuning_type: full\n"


def _llama_factory_finetuning_arguments():
    """LLaMA-Factory's own FinetuningArguments, from a --no-deps install: its module needs
    only the standard library, but its package __init__ imports the heavy dependencies."""
    if importlib.util.find_spec("llamafactory") is None:
        pytest.skip("llamafactory not installed (pip install --no-deps llamafactory==0.9.5)")
    try:
        from llamafactory.hparams import FinetuningArguments
        return FinetuningArguments
    except ImportError:
        pass
    root = Path(importlib.util.find_spec("llamafactory").origin).parent
    spec = importlib.util.spec_from_file_location("_llamafactory_finetuning_args",
                                                  root / "hparams" / "finetuning_args.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.FinetuningArguments


def test_llama_factory_real_arguments_match_the_copied_keys():
    fields = {f.name: f for f in dataclasses.fields(_llama_factory_finetuning_arguments())}
    assert set(LLAMA_FACTORY_KEYS) <= set(fields)
    assert typing.get_args(fields["finetuning_type"].type) == LLAMA_FACTORY_KEYS["finetuning_type"]
    assert fields["freeze_trainable_layers"].type is int
    assert fields["freeze_trainable_modules"].type is str
    assert str in typing.get_args(fields["freeze_extra_modules"].type)


@pytest.mark.parametrize("family,head", CASES)
def test_llama_factory_real_arguments_parse_the_fragment(family, head):
    arguments = _llama_factory_finetuning_arguments()
    from transformers import HfArgumentParser

    cfg = yaml.safe_load(export_plan(_plan(family, head), "llama-factory"))
    # how LLaMA-Factory reads a YAML: HfArgumentParser.parse_dict, unknown keys rejected
    (args,) = HfArgumentParser(arguments).parse_dict(cfg, allow_extra_keys=False)
    # ... and reads the values as _llama_factory_trains does (its __post_init__ splits lists)
    assert (args.finetuning_type, args.freeze_trainable_layers) == \
        (cfg["finetuning_type"], cfg["freeze_trainable_layers"])
    assert args.freeze_trainable_modules == _split(cfg["freeze_trainable_modules"]) == ["all"]
    assert args.freeze_extra_modules == (_split(cfg.get("freeze_extra_modules")) or None)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("fmt,first_key", [("axolotl", "unfrozen_parameters"),
                                           ("llama-factory", "finetuning_type"),
                                           ("peft", "peft_type")])
def test_cli_export_writes_each_format(tmp_path, capsys, fmt, first_key):
    plan_file = _plan("qwen2", "untied-copy").to_json(tmp_path / "plan.json")
    out = tmp_path / "out.txt"
    assert main(["export", "--plan", str(plan_file), "--format", fmt, "--out", str(out)]) == 0
    assert first_key in (yaml.safe_load if fmt != "peft" else json.loads)(out.read_text())
    assert main(["export", "--plan", str(plan_file), "--format", fmt]) == 0
    assert capsys.readouterr().out.endswith(out.read_text())
