"""salf.integrations.axolotl.SalfPlugin, its hooks driven as Axolotl drives them.

Axolotl does not install beside salf's pins (docs/interop.md), so the default suite calls the
hooks with stand-ins for their arguments: `Cfg` for Axolotl's DictDefault (a dict whose
missing keys read None), a transformers Trainer for AxolotlTrainer, and PEFT's
`get_peft_model` with the LoraConfig fields Axolotl's `load_lora` reads from the config. The
last test runs only where axolotl is importable (docs/integrations.md: a separate venv)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from salf.api import pad_collate
from salf.errors import SalfError
from salf.integrations.axolotl import SalfPlugin, check_config
from salf.models.tiny import tiny_model, tiny_tokenizer
from salf.plan import FreezePlan
from salf.train.freeze import freeze_state


class Cfg(dict):
    """Axolotl's DictDefault as the hooks use it: attribute and item access, None if missing."""

    def __getattr__(self, key):
        return self.get(key)


def _rows(n):
    tok = tiny_tokenizer()
    return [{"input_ids": tok(f"The movie was {['good', 'bad'][i % 2]} and the team won {i}")["input_ids"]}
            for i in range(n)]


def _trainer(out, model):
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], disable_tqdm=True, save_strategy="no", remove_unused_columns=False,
                             use_cpu=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=_rows(24), eval_dataset=_rows(8),
                   data_collator=lambda b: pad_collate(b, tiny_tokenizer().pad_token_id))


@pytest.mark.parametrize("cfg, message", [
    ({"salf_plan": 2, "salf_analyze": True}, "keep one"),
    ({"salf_dynamic": True}, "give the starting one"),
    ({"salf_plan": 2, "unfrozen_parameters": ["^lm_head."]}, "unfrozen_parameters freezes layers too"),
    ({"salf_plan": 2, "lisa_n_layers": 4}, "lisa_n_layers"),
    ({"salf_analyze": True, "adapter": "lora"}, "run `salf analyze` first"),
    ({"salf_plan": 2, "adapter": "llama-adapter"}, "not 'llama-adapter'"),
    ({"salf_plan": 2, "salf_dynamic": True, "deepspeed": "zero3.json"}, "not FSDP/DeepSpeed"),
    ({"salf_plan": 2, "salf_dynamic": 5}, "salf_dynamic must be true or a mapping"),
])
def test_pre_model_load_refuses_what_cannot_work(cfg, message):
    with pytest.raises(SalfError, match=message):
        SalfPlugin().pre_model_load(Cfg(cfg))


def test_a_config_without_salf_keys_is_left_alone():
    check_config(Cfg(unfrozen_parameters=["^lm_head."]))
    model = tiny_model("llama")
    SalfPlugin().post_model_build(Cfg(), model)
    assert freeze_state(model) is None and all(p.requires_grad for p in model.parameters())
    assert SalfPlugin().add_callbacks_post_trainer(Cfg(), None) == []


def test_full_weights_with_a_plan_file_and_the_moving_cut(tmp_path):
    FreezePlan.manual(1, 4).to_json(tmp_path / "plan.json")
    cfg = Cfg(salf_plan=str(tmp_path / "plan.json"), salf_dynamic={"policy": "linear", "start": 0.0, "checks": 3},
              output_dir=str(tmp_path))
    plugin = SalfPlugin()
    plugin.pre_model_load(cfg)
    model = tiny_model("llama")
    plugin.post_model_build(cfg, model)
    plugin.post_model_load(cfg, model)
    assert freeze_state(model).eof == 1
    trainer = _trainer(tmp_path, model)
    callbacks = plugin.add_callbacks_post_trainer(cfg, trainer)
    for callback in callbacks:
        trainer.add_callback(callback)
    plugin.post_trainer_create(cfg, trainer)
    embed = model.model.embed_tokens.weight.detach().clone()
    trainer.train()
    assert callbacks[0].schedule == [[0, 1], [4, 2]] and freeze_state(model).eof == 2
    assert torch.equal(model.model.embed_tokens.weight, embed) and callbacks[0].report()["audit"]["ok"]
    assert (tmp_path / "dynamic.json").is_file()


def test_lora_goes_only_above_the_cut_through_axolotls_own_config_keys():
    from peft import LoraConfig, get_peft_model

    cfg = Cfg(salf_plan="2", adapter="lora")
    plugin = SalfPlugin()
    plugin.pre_model_load(cfg)
    model = tiny_model("llama")
    plugin.post_model_build(cfg, model)
    assert cfg.peft_layers_to_transform == [2, 3] and cfg.peft_layers_pattern == ["layers"]
    # what Axolotl's load_lora builds from those keys (loaders/adapter.py), then enables input grads
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  layers_to_transform=cfg.peft_layers_to_transform,
                                                  layers_pattern=cfg.peft_layers_pattern, task_type="CAUSAL_LM"))
    peft_model.enable_input_require_grads()        # Axolotl calls it before any adapter: neutralised
    plugin.post_model_load(cfg, peft_model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".layers.2." in n or ".layers.3." in n) for n in trainable)
    with pytest.raises(SalfError, match="head stays frozen"):
        plugin.post_model_build(Cfg(salf_plan=str(_head_plan()), adapter="lora"), tiny_model("mistral"))


def _head_plan():
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "plan.json"
    FreezePlan.manual(2, 4, head="trainable").to_json(path)
    return path


def test_salf_analyze_cuts_on_the_trainers_own_training_set(tmp_path):
    cfg = Cfg(salf_analyze={"samples": 12}, output_dir=str(tmp_path))
    plugin = SalfPlugin()
    plugin.pre_model_load(cfg)
    model = tiny_model("llama")
    trainer = _trainer(tmp_path, model)
    plugin.post_trainer_create(cfg, trainer)
    plan = FreezePlan.from_json(tmp_path / "salf" / "plan.json")
    assert freeze_state(model).eof == plan.eof and plan.data["samples"] == 12
    assert all(not p.requires_grad for p in model.model.embed_tokens.parameters())


def test_with_the_real_axolotl_the_plugin_registers_and_its_keys_validate():
    axolotl = pytest.importorskip("axolotl", reason="axolotl is not installed here (see the module docstring)")
    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    manager = PluginManager.get_instance()
    manager.register("salf.integrations.axolotl.SalfPlugin")
    assert any(isinstance(p, SalfPlugin) and isinstance(p, BasePlugin) for p in manager.plugins.values())
    cfg = validate_config(DictDefault({
        "base_model": "HuggingFaceTB/SmolLM2-135M", "plugins": ["salf.integrations.axolotl.SalfPlugin"],
        "salf_plan": 2, "salf_dynamic": {"checks": 3}, "datasets": [{"path": "x.jsonl", "type": "alpaca"}],
        "micro_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "sequence_len": 64,
        "output_dir": "out", "num_epochs": 1}))
    assert cfg.salf_plan == 2 and cfg.salf_dynamic == {"checks": 3}, axolotl.__version__
