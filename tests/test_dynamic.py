"""DynamicFreezeCallback in a plain Hugging Face Trainer: the cut moves at its checks, the
moved layers stay bit-identical from the step they froze, the probe reads the trace, and the
integrated cost of the schedule is what torch's FLOP counter measures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainerCallback, TrainingArguments

from salf.config import TrainConfig
from salf.cost import ModelShape, StepSettings, forward_flops
from salf.data import ClassificationTask, collate, encode, pad_token_id
from salf.dynamic import (DynamicFreezeCallback, DynamicSettings, Probe, check_steps, moving_cut,
                          schedule_cost)
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
    step = StepSettings(T, 4, loss_positions="last", attention="eager")
    cost = schedule_cost(ModelShape.from_model(model), callback.schedule, 6, step)
    # the loose keywords of older code give the same numbers
    assert schedule_cost(ModelShape.from_model(model), callback.schedule, 6, seq_len=T, batch_size=4,
                         loss_positions="last", attention="eager") == cost
    assert cost["matmul_flops"] == pytest.approx(counter.get_total_flops(), rel=0.05)
    assert cost["steps_at_eof"] == {"0": 2, "1": 2, "2": 2}
    assert 0 < cost["flops_ratio"] < 1


def test_probe_flops_match_the_flop_counter_and_a_frozen_prefix_is_replayed():
    """A read at cut 2 after one at cut 2 skips layers 1-2 (torch counts only the rest) and
    reads exactly what the full forward reads."""
    tok = tiny_tokenizer()
    model = apply_plan(_counted_llama(), make_plan(2))
    examples = _examples(tok, 8, same_length=True)
    T = len(examples[0]["input_ids"])
    shape = ModelShape.from_model(model)
    probe = Probe([collate(examples[:4], pad_token_id(tok)), collate(examples[4:], pad_token_id(tok))],
                  "classification", TASK.label_token_ids(tok))
    reads = []
    for expected_from in (0, 2):
        with FlopCounterMode(display=False) as counter:
            reads.append(probe.read(model, cut=2))
        assert reads[-1]["from_layer"] == expected_from
        predicted = forward_flops(shape, T, 8, from_layer=expected_from, head_positions=1,
                                  attention="eager")
        assert predicted == pytest.approx(counter.get_total_flops(), rel=0.05)
    full, replayed = reads
    assert replayed["deviation"] == pytest.approx(full["deviation"], abs=1e-5)
    assert replayed["loss"] == pytest.approx(full["loss"], rel=1e-5)
    with FlopCounterMode(display=False) as counter:           # the cut moved: start from h^2
        assert probe.read(model, cut=3)["from_layer"] == 2
    assert forward_flops(shape, T, 8, from_layer=2, head_positions=1, attention="eager") == \
        pytest.approx(counter.get_total_flops(), rel=0.05)


# ----------------------------------------------------------------------------- resume

_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from transformers import TrainerCallback
    import test_dynamic as T

    class Slow(TrainerCallback):          # widen the window for the external SIGKILL
        def on_step_end(self, args, state, control, **kw):
            time.sleep(0.3)

    T.run_dynamic(sys.argv[1], callbacks=[Slow()])
""")


def run_dynamic(out, resume=False, callbacks=None):
    """A dynamic run with checkpoints (gpt2 has dropout: RNG restore matters), one thread so
    that an interrupted and resumed run must end bit-identical to an uninterrupted one."""
    from salf.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = tiny_tokenizer()
        return train(tiny_model("gpt2"), tok, TASK, (_rows(24), []), make_plan(0), out,
                     TrainConfig(max_steps=8, lr=1e-2, batch_size=4, max_length=32, save_steps=2, resume=resume,
                                 seed=0, progress=False),
                     callbacks=[*(callbacks or []), moving_cut(
                         DynamicSettings(policy="linear", start=0.0, checks=4), out_dir=out)])
    finally:
        torch.set_num_threads(threads)


def test_sigkill_then_resume_gives_the_same_schedule_and_weights(tmp_path):
    from safetensors.torch import load_file

    from salf.train.checkpoints import last_checkpoint

    reference = run_dynamic(tmp_path / "ref")
    assert reference["dynamic"]["schedule"] == [[0, 0], [4, 1], [6, 2]]   # linear from 0% to eof 3
    out = tmp_path / "run"
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while int((last_checkpoint(out / "checkpoints") or "-0").rsplit("-", 1)[-1]) < 4:   # past a move
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    resumed = run_dynamic(out, resume=True)
    assert resumed["resumed_from_step"] in (4, 6)
    assert resumed["dynamic"]["schedule"] == reference["dynamic"]["schedule"]
    assert resumed["dynamic"]["audit"]["ok"]
    assert [p["loss"] for p in resumed["train"]["loss_curve"]] == \
        [p["loss"] for p in reference["train"]["loss_curve"]]
    a, b = load_file(str(tmp_path / "ref" / "final" / "model.safetensors")), \
        load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_probing_callback_resumes_its_history_without_a_second_baseline(tmp_path):
    tok = tiny_tokenizer()
    probe = Probe([collate(_examples(tok, 4), pad_token_id(tok))], "classification",
                  TASK.label_token_ids(tok))
    first = DynamicFreezeCallback(DynamicSettings(policy="static", checks=3), probe)
    model = apply_plan(tiny_model("llama"), make_plan(1))
    _trainer(tmp_path / "a", model, tok, first).train()
    state = json.loads(json.dumps(first.state_dict()))             # what a checkpoint holds
    again = DynamicFreezeCallback(DynamicSettings(policy="static", checks=3), probe)
    again.load_state_dict(state)
    assert [c.step for c in again.history] == [0, 2, 4] and again.schedule == first.schedule
    with pytest.raises(Exception, match="dynamic settings differ"):
        DynamicFreezeCallback(DynamicSettings(policy="static", checks=4), probe).load_state_dict(state)


def test_cli_dynamic_options_need_dynamic_and_a_cut(tmp_path):
    import subprocess as sp

    data = tmp_path / "r.csv"
    data.write_text("review,label\n" + "".join(f"film {i} good,positive\nfilm {i} bad,negative\n"
                                                for i in range(20)))
    base = [sys.executable, "-m", "salf", "train", "--model", "tiny-llama", "--dataset", str(data),
            "--text-col", "review", "--label-col", "label", "--max-steps", "2", "--out", str(tmp_path / "o")]
    for extra, message in ((["--freeze-below", "1", "--plasticity-share", "0.2"], "applies to --dynamic"),
                           (["--freeze-below", "1", "--dynamic", "--checks", "0"], "--checks"),
                           (["--full", "--dynamic"], "--full has none"),
                           (["--freeze-below", "1", "--dynamic", "--probe-rows", "40"], "--probe-rows")):
        r = sp.run(base + extra, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0


def test_the_prefix_cache_follows_a_moving_cut(tmp_path):
    """--cache-prefix --dynamic: the cached prefix is rebuilt at each new cut, and training
    is the one without the cache (same losses and weights; over 2 epochs the cache replays)."""
    from salf.train import train

    tok = tiny_tokenizer()
    results = {}
    for cached in (False, True):
        model = tiny_model("llama")
        metrics = train(model, tok, TASK, (_rows(24), []), make_plan(1), tmp_path / str(cached),
                        TrainConfig(epochs=2, batch_size=4, max_length=32, seed=0, progress=False,
                                    cache_prefix=cached),
                        callbacks=[moving_cut(
                            DynamicSettings(policy="linear", start=0.0, checks=4))])
        results[cached] = ([p["loss"] for p in metrics["train"]["loss_curve"]],
                           {n: p.detach().clone() for n, p in model.named_parameters()},
                           metrics)
    assert results[True][2]["dynamic"]["schedule"] == results[False][2]["dynamic"]["schedule"]
    assert len(results[True][2]["dynamic"]["schedule"]) >= 2              # the cut moved
    final_cut = results[True][2]["dynamic"]["schedule"][-1][1]
    assert results[True][2]["prefix_cache"]["eof"] == final_cut          # it followed the cut
    assert results[True][2]["prefix_cache"]["examples"] > 0              # and refilled there
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    for name, p in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], p, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_probe_read_after_a_move_equals_a_full_read_of_the_trained_layers(family):
    """The cut moves 1 -> 3 after layers 2-3 trained: the read starts from the stored h^1,
    runs layers 2-3 as they are now (not as they were stored) and equals a fresh full read;
    the next read replays the new boundary h^3."""
    tok = tiny_tokenizer()
    model = apply_plan(tiny_model(family), make_plan(1))
    batches = [collate(_examples(tok, 6), pad_token_id(tok))]
    probe = Probe(batches, "classification", TASK.label_token_ids(tok))
    before = probe.read(model, cut=1)
    with torch.no_grad():                      # "training" of the layers the move will freeze
        for p in anatomy(model).layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = probe.read(model, cut=3)
    full = Probe(batches, "classification", TASK.label_token_ids(tok)).read(model, cut=3)
    assert (moved["from_layer"], full["from_layer"]) == (1, 0)
    assert abs(moved["deviation"][2] - before["deviation"][2]) > 1e-4   # layer 2 did change
    assert moved["deviation"] == pytest.approx(full["deviation"], abs=1e-5)
    assert moved["loss"] == pytest.approx(full["loss"], rel=1e-5)
    again = probe.read(model, cut=3)
    assert again["from_layer"] == 3 and again["deviation"] == pytest.approx(full["deviation"], abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_a_replayed_probe_read_equals_a_full_one(family):
    tok = tiny_tokenizer()
    model = apply_plan(tiny_model(family), make_plan(2))
    probe = Probe([collate(_examples(tok, 6), pad_token_id(tok))], "classification",
                  TASK.label_token_ids(tok))
    full, replayed = probe.read(model, cut=2), probe.read(model, cut=2)
    assert (full["from_layer"], replayed["from_layer"]) == (0, 2)
    assert replayed["deviation"] == pytest.approx(full["deviation"], abs=1e-5)
    assert replayed["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_a_resumed_probe_starts_from_its_checkpointed_boundary(tmp_path):
    """The probe's stored h^k goes into the checkpoint: after a resume the next read starts
    at the cut, as the uninterrupted run's does, with the same numbers."""
    from salf.train.checkpoints import TENSOR_FILE, load_callback_states, save_callback_states

    tok = tiny_tokenizer()
    model = apply_plan(tiny_model("llama"), make_plan(2))
    batches = [collate(_examples(tok, 4), pad_token_id(tok)), collate(_examples(tok, 3), pad_token_id(tok))]

    def callback():
        probe = Probe(list(batches), "classification", TASK.label_token_ids(tok))
        return DynamicFreezeCallback(DynamicSettings(policy="static", checks=3), probe)

    running = callback()
    running.probe.read(model, cut=2)                   # stores h^2 of both batches
    save_callback_states(tmp_path, [running])
    assert (tmp_path / TENSOR_FILE).is_file()
    with torch.no_grad():                              # training goes on above the cut
        for p in anatomy(model).layers[2].parameters():
            p.add_(0.01)
    resumed = callback()
    load_callback_states(tmp_path, [resumed])
    a, b = running.probe.read(model, cut=2), resumed.probe.read(model, cut=2)
    assert a["from_layer"] == b["from_layer"] == 2
    assert a["deviation"] == b["deviation"] and a["cosines"] == b["cosines"] and a["loss"] == b["loss"]

    (tmp_path / TENSOR_FILE).unlink()                  # a checkpoint written before the tensors were
    older = callback()
    load_callback_states(tmp_path, [older])
    assert older.probe.read(model, cut=2)["from_layer"] == 0
