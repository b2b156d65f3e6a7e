"""A tiny random Llama through TRL's real SFTTrainer (conversational and plain-text data) with
a static plan, with the moving cut, and with LoRA above the cut (salf's LoRA path,
docs/integrations.md says why): the audit holds (frozen tensors bit-identical), no frozen
parameter holds optimizer state, and a resume continues the schedule."""

from __future__ import annotations

import copy

import pytest
import torch

import salf
from salf.errors import SalfError
from salf.models.tiny import tiny_model, tiny_tokenizer
from salf.train import compare, snapshot
from salf.train.freeze import freeze_state

trl = pytest.importorskip("trl", reason="the test extra (trl, pinned in requirements.lock) is not installed")
datasets = pytest.importorskip("datasets")

WORDS = ["good", "bad", "warm", "dull"]
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())     # the cached one stays without a chat template
    tok.chat_template = CHAT
    return tok


def _data(kind: str, n: int = 24):
    if kind == "conversational":
        rows = [{"messages": [{"role": "user", "content": f"Was the movie {WORDS[i % 4]}?"},
                              {"role": "assistant", "content": f"It was {WORDS[(i + 1) % 4]}, {i}"}]}
                for i in range(n)]
    else:
        rows = [{"text": f"The movie was {WORDS[i % 4]} and the team won {i}"} for i in range(n)]
    ds = datasets.Dataset.from_list(rows)
    return ds.select(range(16)), ds.select(range(16, n))


def _trainer(out, model, kind="plain", steps=6, save_steps=None):
    config = trl.SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                           learning_rate=1e-2, report_to=[], disable_tqdm=True, use_cpu=True, bf16=False,
                           save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                           max_length=48, seed=0, data_seed=0, logging_steps=1, dataset_num_proc=None)
    train, held_out = _data(kind)
    return trl.SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=held_out,
                          processing_class=_tokenizer())


def _frozen_without_state(model, trainer) -> bool:
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return bool(frozen) and all(p not in inner.state for p in frozen)


@pytest.mark.parametrize("kind", ["conversational", "plain"])
def test_sft_trainer_with_a_static_plan_keeps_the_frozen_prefix_bit_identical(tmp_path, kind):
    model = salf.freeze(tiny_model("llama"), 2)
    before = snapshot(model)
    trainer = _trainer(tmp_path, model, kind)
    assert trainer.args.gradient_checkpointing     # TRL's default: salf keeps it above the cut
    trainer.train()
    report = compare(before, snapshot(model), strict=True)
    assert report["ok"] and report["frozen"]["changed"] == [] and report["trainable"]["changed"] > 0
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers[:2])
    assert _frozen_without_state(model, trainer)


def test_sft_trainer_with_the_moving_cut_reads_its_eval_set_and_moves(tmp_path):
    """The probe is SFTTrainer's own tokenized eval set and data collator; thresholds that
    hold nothing back make the salf policy move at its second probe check."""
    model = salf.freeze(tiny_model("llama"), 1)
    trainer = _trainer(tmp_path, model, "conversational", steps=8)
    cut = salf.MovingCut(trainer.eval_dataset, collator=trainer.data_collator, checks=4, tau=1e9,
                         epsilon=1e9, min_points=2, out_dir=tmp_path)
    trainer.add_callback(cut)
    before = snapshot(model)
    trainer.train()
    checks = cut.report()["checks"]
    assert [c["step"] for c in checks] == [0, 2, 4, 6]
    assert all(len(c["deviation"]) == 5 and c["loss"] > 0 for c in checks)
    assert cut.schedule[0] == [0, 1] and len(cut.schedule) >= 2 and cut.schedule[-1][1] == 3
    assert freeze_state(model).eof == 3 and _frozen_without_state(model, trainer)
    assert cut.report()["audit"]["ok"] and compare(before, snapshot(model), strict=False)["frozen"]["changed"] == []
    assert (tmp_path / "dynamic.json").is_file()


def test_sft_trainer_resume_continues_the_moving_cut(tmp_path):
    def run(resume=None):
        model = salf.freeze(tiny_model("llama"), 0)
        trainer = _trainer(tmp_path, model, steps=6, save_steps=3)
        cut = salf.MovingCut(policy="linear", start=0.0, checks=3)
        trainer.add_callback(cut)
        trainer.train(resume_from_checkpoint=resume)
        return model, cut, trainer

    whole, whole_cut, _ = run()
    resumed, resumed_cut, trainer = run(str(tmp_path / "checkpoint-3"))
    assert resumed_cut.schedule == whole_cut.schedule == [[0, 0], [2, 1], [4, 2]]
    assert _frozen_without_state(resumed, trainer) and resumed_cut.report()["audit"]["ok"]
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_sft_trainer_with_lora_above_the_cut(tmp_path):
    """salf's LoRA path: adapters on layers 2-4 only, the base bit-identical, and the moving
    cut freezes layer 2's adapters at step 4 (they leave the optimizer state too)."""
    model = salf.freeze(tiny_model("llama"), 1, lora={"r": 4})
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {"1", "2", "3"}
    base_before = snapshot(model)
    trainer = _trainer(tmp_path, model, "conversational", steps=6)
    cut = salf.MovingCut(policy="linear", start=0.0, checks=3)
    trainer.add_callback(cut)
    trainer.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".layers.2." in n or ".layers.3." in n) for n in trainable)
    assert cut.schedule == [[0, 1], [4, 2]]
    assert set(cut.report()["audit"]["frozen_at"]) == {n for n, _ in model.named_parameters()
                                                       if "lora_" in n and ".layers.1." in n}
    report = compare(base_before, snapshot(model), strict=False)
    assert report["frozen"]["changed"] == [] and report["trainable"]["changed"] > 0
    assert cut.report()["audit"]["ok"] and _frozen_without_state(model, trainer)


def test_trl_peft_config_on_a_frozen_model_is_caught_when_it_adapts_frozen_layers(tmp_path):
    """TRL's own peft_config adapts every layer unless told otherwise; the moving cut refuses
    such a model instead of training adapters below the cut."""
    from peft import LoraConfig

    model = salf.freeze(tiny_model("llama"), 2)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config_trainer = _trainer(tmp_path, model, steps=2)
    trainer = trl.SFTTrainer(model=model, args=config_trainer.args, train_dataset=config_trainer.train_dataset,
                             processing_class=_tokenizer(), peft_config=config)
    trainer.add_callback(salf.MovingCut(policy="linear", checks=2))
    with pytest.raises(SalfError, match="below the cut"):
        trainer.train()
