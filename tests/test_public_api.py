"""The public API of docs/api.md: `import salf` gives exactly it, `salf.freeze` takes every
plan form, and `salf.MovingCut` in a plain Trainer trains what it should and freezes what it
should — attached after the optimizer exists (the LISA bug), under gradient accumulation,
and across the Trainer's own checkpoint and resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

import salf
from salf.api import ArgumentTypeError, pad_collate
from salf.errors import SalfError
from salf.models.tiny import tiny_model, tiny_tokenizer
from salf.plan import FreezePlan
from salf.train.freeze import freeze_state

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
WORDS = ["good", "bad", "warm", "dull"]


def _rows(n, offset=0):
    tok = tiny_tokenizer()
    return [{"input_ids": tok(f"The movie was {WORDS[i % 4]} and the team won {i + offset}")["input_ids"]}
            for i in range(n)]


def _collate(batch):
    return pad_collate(batch, tiny_tokenizer().pad_token_id)


def _trainer(out, model, steps=6, accumulation=1, batch=4, save_steps=None, optimizer_first=False):
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-2, report_to=[],
                             disable_tqdm=True, save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 500, remove_unused_columns=False, use_cpu=True, seed=0,
                             data_seed=0, lr_scheduler_type="linear", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(24), data_collator=_collate)
    if optimizer_first:
        trainer.create_optimizer()
    return trainer


def _optimizer_state(trainer) -> dict:
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return inner.state


# ------------------------------------------------------------------------------ the surface
def _documented_names() -> set[str]:
    """The top-level names docs/api.md documents: its `## salf.NAME` headings."""
    return set(re.findall(r"^## `?salf\.(\w+)", DOCS.read_text(), flags=re.M))


def test_import_salf_gives_exactly_the_documented_surface():
    documented = _documented_names()
    assert documented == {"analyze", "freeze", "MovingCut", "__version__"}
    code = ("import json, types, salf; print(json.dumps(sorted(n for n in dir(salf) if not n.startswith('_') "
            "and not isinstance(getattr(salf, n), types.ModuleType))))")
    shown = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert set(shown) == documented - {"__version__"}
    assert set(salf.__all__) == documented
    for name in documented - {"__version__"}:
        doc = getattr(salf, name).__doc__ or ""
        assert "Example::" in doc and "salf." in doc.split("Example::")[1], name
    with pytest.raises(AttributeError):
        salf.apply_plan   # noqa: B018 (internal names stay internal)


def test_import_salf_loads_no_torch():
    code = "import sys, salf; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------ salf.freeze
def test_freeze_takes_a_plan_its_dict_its_path_or_an_int_cut(tmp_path):
    plan = FreezePlan.manual(2, 4, model={"num_layers": 4, "tied": True})
    plan.to_json(tmp_path / "plan.json")
    for form in (plan, plan.to_dict(), str(tmp_path / "plan.json"), tmp_path / "plan.json", 2):
        model = salf.freeze(tiny_model("llama"), form)
        trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and ".layers." in n}
        assert freeze_state(model).eof == 2 and trainable == {"2", "3"}, form
    lora = salf.freeze(tiny_model("llama"), 3, lora={"r": 4})
    assert {n for n, p in lora.named_parameters() if p.requires_grad} and all(
        "lora_" in n and ".layers.3." in n for n, p in lora.named_parameters() if p.requires_grad)


def test_freeze_refuses_bad_input_with_one_line():
    with pytest.raises(ArgumentTypeError, match="plan must be a FreezePlan"):
        salf.freeze(tiny_model("llama"), 2.5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        salf.freeze("tiny-llama", 2)
    with pytest.raises(SalfError, match=r"eof must be an integer in \[0, 4\]"):
        salf.freeze(tiny_model("llama"), 7)
    with pytest.raises(SalfError, match="plan mismatch: num_layers differs"):
        salf.freeze(tiny_model("llama"), FreezePlan.manual(2, 6))
    with pytest.raises(SalfError, match="file not found"):
        salf.freeze(tiny_model("llama"), "no/such/plan.json")


# ------------------------------------------------------------------------------ salf.analyze
def test_analyze_reads_tokenized_rows_and_its_plan_freezes_the_model(tmp_path):
    model = tiny_model("llama")
    analysis = salf.analyze(model, _rows(16), tokenizer=tiny_tokenizer(), samples=12, out_dir=tmp_path)
    plan = analysis.plan
    assert plan.num_layers == 4 and 0 <= plan.eof <= 3 and plan.model["weights_hash"]
    assert len(analysis.trace.spaces) == 5 and analysis.trace.data["samples"] == 12
    assert FreezePlan.from_json(tmp_path / "plan.json").eof == plan.eof
    assert freeze_state(salf.freeze(model, tmp_path / "plan.json")).eof == plan.eof
    # text rows with a tokenizer give the same trace as the same rows tokenized
    texts = [{"text": tiny_tokenizer().decode(r["input_ids"])} for r in _rows(16)]
    again = salf.analyze(tiny_model("llama"), texts, tokenizer=tiny_tokenizer(), samples=12)
    assert again.trace.deviations == pytest.approx(analysis.trace.deviations, rel=1e-5, abs=1e-7)


def test_analyze_and_moving_cut_refuse_rows_they_cannot_read():
    with pytest.raises(SalfError, match="rows must be tokenized"):
        salf.analyze(tiny_model("llama"), [{"messages": []}])
    with pytest.raises(SalfError, match="need collator= .* or tokenizer="):
        salf.analyze(tiny_model("llama"), _rows(3) + [{"input_ids": [5, 6]}])
    with pytest.raises(ArgumentTypeError, match="must be a datasets.Dataset or a list of rows"):
        salf.MovingCut("held-out.jsonl", tokenizer=tiny_tokenizer())
    with pytest.raises(SalfError, match="reads a held-out probe set"):
        salf.MovingCut()
    with pytest.raises(SalfError, match="unknown dynamic setting"):
        salf.MovingCut(policy="linear", chekcs=3)
    with pytest.raises(SalfError, match="no token carries a loss"):
        salf.MovingCut([{"input_ids": [1, 2, 3], "labels": [-100] * 3}], tokenizer=tiny_tokenizer())


# ------------------------------------------------------------------------------ MovingCut
def test_a_callback_attached_after_the_optimizer_exists_trains_and_freezes_what_it_should(tmp_path):
    """LISA (LMFlow #726): the optimizer is built over every parameter, then the callback
    applies the cut and moves it. What trains changes; what is frozen neither changes nor
    holds optimizer state."""
    model = tiny_model("llama")
    trainer = _trainer(tmp_path, model, optimizer_first=True)
    listed = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert listed == {id(p) for p in model.parameters()}         # built before any freezing
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cut = salf.MovingCut(policy="linear", plan=1, start=0.0, checks=3)
    trainer.add_callback(cut)
    trainer.train()
    assert cut.schedule == [[0, 1], [4, 2]]
    state = _optimizer_state(trainer)
    for name, p in model.named_parameters():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        if layer is not None and layer >= 2 or name == "model.norm.weight":
            assert p.requires_grad and p in state and not torch.equal(p, before[name]), name
        else:
            assert not p.requires_grad and p not in state and p.grad is None, name
            if layer != 1:       # layer 2 (index 1) trained for 4 steps, then froze
                assert torch.equal(p, before[name]), name
    assert cut.report()["audit"]["ok"] and not cut.report()["audit"]["changed_since_start"]
    assert cut.report()["audit"]["frozen_during_run"] == 9


def test_state_an_optimizer_already_holds_for_frozen_parameters_is_dropped(tmp_path):
    model = tiny_model("llama")
    trainer = _trainer(tmp_path, model, optimizer_first=True)
    batch = _collate(_rows(4))
    model(**batch).loss.backward()
    trainer.optimizer.step()          # every parameter now has AdamW moments
    trainer.optimizer.zero_grad()
    assert len(_optimizer_state(trainer)) == len(list(model.parameters()))
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.add_callback(salf.MovingCut(policy="linear", plan=2, start=0.5, checks=2))
    trainer.train()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p not in _optimizer_state(trainer) and torch.equal(p, stepped[name]), name


def test_parameters_made_trainable_after_the_optimizer_was_built_are_refused(tmp_path):
    """The LISA failure itself: LoRA adapters added after the optimizer exists would never
    train; the callback says so instead of training nothing."""
    model = tiny_model("llama")
    trainer = _trainer(tmp_path, model, optimizer_first=True)
    trainer.model = salf.freeze(model, 2, lora={"r": 4})
    trainer.add_callback(salf.MovingCut(policy="linear", checks=2))
    with pytest.raises(SalfError, match="are not in the optimizer .*lora_A"):
        trainer.train()


def test_gradient_accumulation_moves_at_optimizer_steps(tmp_path):
    """4 rows per optimizer step as 2 x 2 micro-batches: the same schedule as 1 x 4, at
    optimizer steps, and the same weights to float rounding."""
    runs = {}
    for accumulation, batch in ((1, 4), (2, 2)):
        model = salf.freeze(tiny_model("llama"), 0)
        cut = salf.MovingCut(policy="linear", start=0.0, checks=3)
        trainer = _trainer(tmp_path / f"ga{accumulation}", model, accumulation=accumulation, batch=batch)
        trainer.add_callback(cut)
        trainer.train()
        assert trainer.state.global_step == 6 and cut.report()["audit"]["ok"]
        assert all(p not in _optimizer_state(trainer) for p in model.parameters() if not p.requires_grad)
        runs[accumulation] = (cut.schedule, {n: p.detach().clone() for n, p in model.named_parameters()})
    assert runs[1][0] == runs[2][0] == [[0, 0], [2, 1], [4, 2]]
    for name, value in runs[1][1].items():
        assert torch.allclose(value, runs[2][1][name], atol=1e-5), name


def test_resume_from_the_trainers_checkpoint_continues_the_schedule(tmp_path):
    """Checkpoint at step 3 (after the move at 2, before the one at 4); a fresh model and
    Trainer resumed from it end where the uninterrupted run ends."""
    def run(out, resume=None):
        model = salf.freeze(tiny_model("llama"), 0)
        cut = salf.MovingCut(policy="linear", start=0.0, checks=3, out_dir=out)
        trainer = _trainer(out, model, save_steps=3)
        trainer.add_callback(cut)
        trainer.train(resume_from_checkpoint=resume)
        return model, cut, trainer

    whole, whole_cut, _ = run(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["MovingCut"]["attributes"]["salf_state"]["dynamic"]["schedule"] == [
        [0, 0], [2, 1]]
    resumed, resumed_cut, trainer = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed_cut.schedule == whole_cut.schedule == [[0, 0], [2, 1], [4, 2]]
    assert freeze_state(resumed).eof == 2
    assert all(p not in _optimizer_state(trainer) for p in resumed.parameters() if not p.requires_grad)
    assert resumed_cut.report()["audit"]["ok"]
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_moving_cut_refuses_what_it_cannot_run(tmp_path):
    model = tiny_model("llama")
    trainer = _trainer(tmp_path, model)
    trainer.add_callback(salf.MovingCut(policy="linear", checks=2))
    with pytest.raises(SalfError, match="the model has no cut"):
        trainer.train()
    trainer = _trainer(tmp_path, salf.freeze(tiny_model("llama"), 1))
    trainer.args.restore_callback_states_from_checkpoint = True
    trainer.add_callback(salf.MovingCut(policy="linear", checks=2))
    with pytest.raises(SalfError, match="restore_callback_states_from_checkpoint=False"):
        trainer.train()
