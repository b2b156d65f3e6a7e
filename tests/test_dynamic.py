"""DynamicFreezeCallback in a plain Hugging Face Trainer: the cut moves at its checks, the
moved layers stay bit-identical from the step they froze, the probe reads the trace, and the
integrated cost of the schedule is what torch's FLOP counter measures."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainerCallback, TrainingArguments

from salf.cost import ModelShape
from salf.data import ClassificationTask, collate, encode, pad_token_id
from salf.dynamic import DynamicFreezeCallback, DynamicSettings, Probe, check_steps, schedule_cost
from salf.dynamic.cost import probe_forward_flops
from salf.models.anatomy import anatomy
from salf.models.tiny import tiny_model, tiny_tokenizer
from salf.train import apply_plan
from salf.train.freeze import freeze_state

TASK = ClassificationTask("Review: {text} Sentiment:", {"pos": " positive", "neg": " negative"})


def make_plan(eof, num_layers=4):
    return types.SimpleNamespace(eof=eof, num_layers=num_layers, head="frozen", train_embeddings=False)


def _rows(n, same_length=False):
    words = ["good", "bad", "warm", "dull"]
    return [{"text": " ".join(words[(i + j) % 4] for j in range(6 if same_length else 3 + i % 4)),
             "label": "pos" if i % 2 else "neg"} for i in range(n)]


def _examples(tok, n, same_length=False):
    return encode(TASK, tok, _rows(n, same_length), 32)


class _LabelLoss(Trainer):
    """The label-position loss salf trains with (logits at the last position only)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from salf.losses import batch_loss

        return batch_loss(model, inputs, "label")


def _trainer(tmp_path, model, tok, callback, steps=6, n=24, same_length=False):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], disable_tqdm=True, save_strategy="no",
                             remove_unused_columns=False, seed=0, data_seed=0, lr_scheduler_type="linear")
    return _LabelLoss(model=model, args=args, train_dataset=_examples(tok, n, same_length),
                      data_collator=lambda b: collate(b, pad_token_id(tok)), callbacks=[callback])


def test_check_steps_are_evenly_spaced_inside_the_run():
    assert check_steps(120, 10) == [12, 24, 36, 48, 60, 72, 84, 96, 108]
    assert check_steps(6, 3) == [2, 4]
    assert check_steps(3, 10) == [1, 2]


def test_a_fixed_schedule_moves_the_cut_and_frozen_layers_never_change_again(tmp_path):
    tok = tiny_tokenizer()
    model = apply_plan(tiny_model("llama"), make_plan(0))
    anat = anatomy(model)
    callback = DynamicFreezeCallback(DynamicSettings(policy="linear", start=0.0, checks=3),
                                     out_dir=tmp_path)
    seen = {}     # step -> every weight after it

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer = _trainer(tmp_path, model, tok, callback)
    trainer.add_callback(Snapshots())
    fired = []    # (layer index, steps finished when its backward ran)
    hooks = [layer.register_full_backward_hook(lambda m, gi, go, i=i: fired.append((i, len(seen))))
             for i, layer in enumerate(anat.layers)]
    trainer.train()
    for h in hooks:
        h.remove()
    # linear from 0% to max_eof 3 over 6 steps, checks at 2 and 4: eof 1 after step 2, 2 after 4
    assert callback.schedule == [[0, 0], [2, 1], [4, 2]]
    assert freeze_state(model).eof == 2
    assert callback.audit(model)["ok"]
    frozen_at = callback.audit(model)["frozen_at"]
    assert {s for n, s in frozen_at.items() if ".layers.0." in n} == {2}
    assert {s for n, s in frozen_at.items() if ".layers.1." in n} == {4}
    final = dict(model.named_parameters())
    for name, step in frozen_at.items():
        assert torch.equal(final[name], seen[step][name]), name   # unchanged since it froze
    # backward never reached layer 1 (index 0) after its freeze at step 2, nor layer 2 after 4
    assert not [f for f in fired if f[0] == 0 and f[1] >= 2]
    assert not [f for f in fired if f[0] == 1 and f[1] >= 4]
    assert (tmp_path / "dynamic.json").is_file()


def test_the_probe_reads_the_trace_and_salf_policy_logs_every_check(tmp_path):
    tok = tiny_tokenizer()
    model = apply_plan(tiny_model("llama"), make_plan(1))
    batches = [collate(_examples(tok, 8)[i:i + 4], pad_token_id(tok)) for i in (0, 4)]
    probe = Probe(batches, "classification", TASK.label_token_ids(tok))
    read = probe.read(model)
    assert len(read["deviation"]) == 5 and read["loss"] > 0 and read["targets"] == 8
    callback = DynamicFreezeCallback(DynamicSettings(policy="salf", checks=3), probe, out_dir=tmp_path)
    _trainer(tmp_path, model, tok, callback).train()
    report = callback.report()
    assert [c["step"] for c in report["checks"]] == [0, 2, 4]
    assert all(len(c["deviation"]) == 5 and c["loss"] is not None for c in report["checks"])
    assert len(report["decisions"]) == 2 and all(d["reason"] for d in report["decisions"])
    assert report["probe"]["reads"] == 3 and report["schedule"][0] == [0, 1]


def _counted_llama():
    """Eager attention: torch's FLOP counter does not count CPU flash attention."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    return model


def test_integrated_cost_of_a_two_move_schedule_matches_the_flop_counter(tmp_path):
    """Every training step at the cut in force, summed, is what torch counts over the run."""
    tok = tiny_tokenizer()
    model = apply_plan(_counted_llama(), make_plan(0))
    examples = _examples(tok, 24, same_length=True)
    T = len(examples[0]["input_ids"])
    assert all(len(e["input_ids"]) == T for e in examples)   # the cost model's fixed length
    callback = DynamicFreezeCallback(DynamicSettings(policy="linear", start=0.0, checks=3))
    trainer = _trainer(tmp_path, model, tok, callback, same_length=True)
    with FlopCounterMode(display=False) as counter:
        trainer.train()
    assert callback.schedule == [[0, 0], [2, 1], [4, 2]]
    cost = schedule_cost(ModelShape.from_model(model), callback.schedule, 6, seq_len=T, batch_size=4,
                         loss_positions="last", attention="eager")
    assert cost["matmul_flops"] == pytest.approx(counter.get_total_flops(), rel=0.05)
    assert cost["steps_at_eof"] == {"0": 2, "1": 2, "2": 2}
    assert 0 < cost["flops_ratio"] < 1


def test_probe_flops_match_the_flop_counter():
    tok = tiny_tokenizer()
    model = apply_plan(_counted_llama(), make_plan(0))
    examples = _examples(tok, 8, same_length=True)
    T = len(examples[0]["input_ids"])
    probe = Probe([collate(examples, pad_token_id(tok))], "classification", TASK.label_token_ids(tok))
    with FlopCounterMode(display=False) as counter:
        probe.read(model)
    predicted = probe_forward_flops(ModelShape.from_model(model), 8, T, 1, attention="eager")
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.05)
