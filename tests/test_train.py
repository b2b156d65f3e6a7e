"""train/evaluate/audit on tiny models: learning, audit, LoRA and head round-trips, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from salf.config import TrainConfig
from salf.data import ClassificationTask, SFTTask
from salf.errors import SalfError
from salf.models.anatomy import anatomy
from salf.models.tiny import tiny_model, tiny_tokenizer
from salf.train import (LoraSettings, apply_plan, compare, evaluate, load_trained, snapshot, train,
                        write_audit)
from salf.train.checkpoints import last_checkpoint

TASK = ClassificationTask("Review: {text} Sentiment:", {"pos": " positive", "neg": " negative"})


def rows(n=24):
    # trivially learnable: the label is written in the text
    return [{"text": f"good good movie {i}" if i % 2 else f"bad bad film {i}",
             "label": "pos" if i % 2 else "neg"} for i in range(n)]


def make_plan(eof, head="frozen", num_layers=4):
    return types.SimpleNamespace(eof=eof, num_layers=num_layers, head=head, train_embeddings=False)


COMMON = dict(batch_size=4, max_length=32, progress=False, seed=0)
# A saved model reloaded runs the same weights through other code paths (kernels, thread
# counts, no autocast wrapper): its evaluation agrees to ~1e-7, not bit for bit. What these
# tests catch (autocast or dropout left on, a wrong head) moves it by 1e-3 or more.
RELOAD_RTOL = 1e-5


def test_training_reduces_loss_and_keeps_frozen_weights(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not n.startswith(("model.layers.2", "model.layers.3", "model.norm"))}
    before = evaluate(model, tok, TASK, rows(8), batch_size=8, max_length=32)
    metrics = train(model, tok, TASK, (rows(), rows(8)), make_plan(2), tmp_path,
                    TrainConfig(max_steps=12, lr=5e-3, eval_steps=6, **COMMON))
    after = metrics["eval"]
    assert after["loss"] < before["loss"] - 0.1
    assert after["label_loss"] < before["label_loss"]
    curve = [p["loss"] for p in metrics["train"]["loss_curve"]]
    assert len(curve) == 12 and sum(curve[-3:]) < sum(curve[:3])
    assert [e["step"] for e in metrics["eval_curve"]] == [6, 12]

    # frozen weights bit-identical (checked independently of the audit code) ...
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    # ... and the audit says the same
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] and audit["frozen"]["changed"] == [] and audit["trainable"]["changed"] > 0
    assert audit["frozen"]["count"] == len(frozen_before)

    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["timing"]["median_step_s"] > 0 and m["timing"]["tokens_per_s"] > 0
    assert m["memory"]["peak_rss_bytes"] > 0
    assert 0 < m["params"]["trainable"] < m["params"]["total"]
    assert m["plan"]["eof"] == 2 and m["truncation"]["eof"] == 2
    assert json.loads((tmp_path / "plan.json").read_text())["eof"] == 2

    # the saved model reproduces the final evaluation
    reloaded, tok2 = load_trained(tmp_path / "final")
    again = evaluate(reloaded, tok2, TASK, rows(8), batch_size=8, max_length=32)
    assert again == pytest.approx(after, rel=RELOAD_RTOL)


def test_audit_flags_a_changed_frozen_weight(tmp_path):
    model = apply_plan(tiny_model("llama"), make_plan(2))
    before = snapshot(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-6
        model.model.layers[3].mlp.up_proj.weight[0, 0] += 1.0
    report = compare(before, snapshot(model), make_plan(2), strict=False)
    assert not report["ok"]
    assert report["frozen"]["changed"] == ["model.layers.0.mlp.up_proj.weight"]
    assert report["trainable"]["changed"] == 1
    write_audit(tmp_path / "audit.json", report)
    assert json.loads((tmp_path / "audit.json").read_text())["violations"]
    with pytest.raises(SalfError, match="audit failed"):
        compare(before, snapshot(model), make_plan(2))


def test_lora_adapter_round_trip(tmp_path):
    from peft import PeftModel

    tok = tiny_tokenizer()
    metrics = train(tiny_model("llama"), tok, TASK, (rows(), rows(8)), make_plan(2), tmp_path,
                    TrainConfig(lora=LoraSettings(r=4), max_steps=6, lr=1e-2, **COMMON))
    final = tmp_path / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / "salf.json").read_text())["base"] == "tiny-llama"
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] and all("lora_" in n for n in audit["trainable"]["unchanged"])

    reloaded = PeftModel.from_pretrained(tiny_model("llama"), str(final))
    assert evaluate(reloaded, tok, TASK, rows(8), 8, 32) == pytest.approx(metrics["eval"], rel=RELOAD_RTOL)
    via_salf, _ = load_trained(final, load_base=lambda spec: tiny_model(spec.removeprefix("tiny-")))
    assert evaluate(via_salf, tok, TASK, rows(8), 8, 32) == pytest.approx(metrics["eval"], rel=RELOAD_RTOL)


def test_untied_copy_head_trains_and_reloads_separately(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("qwen2")                     # tied embeddings
    emb = model.get_input_embeddings().weight.detach().clone()
    metrics = train(model, tok, TASK, (rows(), rows(8)), make_plan(3, head="untied-copy"), tmp_path,
                    TrainConfig(max_steps=4, lr=1e-2, **COMMON))
    anat = anatomy(model)
    assert torch.equal(model.get_input_embeddings().weight, emb)       # embedding untouched
    assert not torch.equal(anat.head.weight, emb)                       # head copy trained
    assert metrics["audit"]["ok"]
    reloaded, _ = load_trained(tmp_path / "final")
    ra = anatomy(reloaded)
    assert not ra.tied
    assert torch.equal(reloaded.get_input_embeddings().weight, emb)
    assert torch.equal(ra.head.weight, anat.head.weight)


def test_sft_and_lm_losses(tmp_path):
    tok = tiny_tokenizer()
    task = SFTTask("Question: {prompt} Answer:")
    sft_rows = [{"prompt": "How are you?", "response": "I am fine, thank you."}] * 16
    before = evaluate(tiny_model("gpt2"), tok, task, sft_rows[:4], 4, 32)
    metrics = train(tiny_model("gpt2"), tok, task, (sft_rows, sft_rows[:4]), make_plan(1), tmp_path / "a",
                    TrainConfig(max_steps=8, lr=1e-2, gradient_checkpointing=True, **COMMON))
    assert metrics["eval"]["loss"] < before["loss"] - 0.5
    assert metrics["eval"]["perplexity"] == pytest.approx(2.718281828 ** metrics["eval"]["loss"], rel=1e-6)
    lm = train(tiny_model("llama"), tok, TASK, (rows(8), rows(4)), make_plan(2), tmp_path / "b",
               TrainConfig(max_steps=2, loss="lm", **COMMON))
    assert lm["loss_kind"] == "lm" and lm["audit"]["ok"]


# ---------------------------------------------------------------------------- resume

def test_sft_eval_standard_error_matches_row_by_row_evaluation():
    tok = tiny_tokenizer()
    task = SFTTask("Question: {prompt} Answer:")
    sft_rows = [{"prompt": f"What is {i}?", "response": "It is " + "a number " * (1 + i % 4)}
                for i in range(9)]
    model = tiny_model("llama")
    batched = evaluate(model, tok, task, sft_rows, 4, 48)     # padded batches of mixed lengths
    singles = [evaluate(model, tok, task, [r], 1, 48) for r in sft_rows]
    sums = [s["loss"] * s["tokens"] for s in singles]
    counts = [s["tokens"] for s in singles]
    mean = sum(sums) / sum(counts)
    assert batched["loss"] == pytest.approx(mean, rel=1e-5)
    n = len(sums)
    se = (sum((s - mean * c) ** 2 for s, c in zip(sums, counts)) * n / (n - 1)) ** 0.5 / sum(counts)
    assert batched["loss_se"] == pytest.approx(se, rel=1e-4)
    assert 0 < batched["loss_se"] < batched["loss"]


_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time, types
    sys.path.insert(0, {tests!r})
    from transformers import TrainerCallback
    import test_train as T
    from salf.train.trainer import SalfTrainer

    out, mode = sys.argv[1], sys.argv[2]

    class Slow(TrainerCallback):          # widen the window for the external SIGKILL
        def on_step_end(self, args, state, control, **kw):
            time.sleep(0.3)

    if mode == "crash-in-save":           # die halfway through writing checkpoint-4
        original = SalfTrainer._save_rng_state
        def dying(self, output_dir):
            if self.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, output_dir)
        SalfTrainer._save_rng_state = dying
    T.run_resumable(out, callbacks=[Slow()] if mode == "slow" else None)
""")


def run_resumable(out, resume=False, callbacks=None):
    """Shared by the tests and the subprocess: gpt2 has dropout, so RNG restore matters.

    One intra-op thread: CPU kernels round differently with 1 or 2 threads, and
    with 2 we saw rare ~1e-7 divergences between otherwise identical processes;
    with a fixed single thread every reduction has one order, so resume must be exact.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tiny_model("gpt2"), tiny_tokenizer(), TASK, (rows(), rows(8)), make_plan(1), out,
                     TrainConfig(max_steps=8, lr=1e-2, eval_steps=3, save_steps=2, resume=resume, **COMMON),
                     callbacks=callbacks)
    finally:
        torch.set_num_threads(threads)


def _spawn(tmp_path, out, mode):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    return subprocess.Popen([sys.executable, str(script), str(out), mode],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _comparable(metrics):
    return {"eval": metrics["eval"], "loss_curve": metrics["train"]["loss_curve"],
            "eval_curve": metrics["eval_curve"], "steps": metrics["train"]["steps"]}


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return run_resumable(out), out


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, reference):
    ref_metrics, ref_out = reference
    out = tmp_path / "run"
    proc = _spawn(tmp_path, out, "slow")
    deadline = time.time() + 60
    while last_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists() and not (out / "metrics.json").exists()   # it really died
    step = int(last_checkpoint(out / "checkpoints").rsplit("-", 1)[-1])
    assert step < 8

    resumed = run_resumable(out, resume=True)
    assert resumed["resumed_from_step"] >= step
    assert _comparable(resumed) == _comparable(ref_metrics)
    a, b = _weights(ref_out / "final"), _weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the step time of the whole run counts the steps before the kill (each slept 0.3 s)
    logged = [json.loads(line)["step_s"] for line in (out / "train_log.jsonl").read_text().splitlines()
              if "step_s" in line]
    assert len(logged) == 8
    assert resumed["timing"]["steps_s_total"] == pytest.approx(sum(logged), rel=1e-9)
    assert resumed["timing"]["steps_s_total"] >= 0.3 * resumed["resumed_from_step"]


def test_crash_during_checkpoint_leaves_no_partial_checkpoint(tmp_path, reference):
    ref_metrics, _ = reference
    out = tmp_path / "run"
    proc = _spawn(tmp_path, out, "crash-in-save")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "tmp-checkpoint-4"]          # the half-written one is staged only
    assert last_checkpoint(out / "checkpoints").endswith("checkpoint-2")

    with pytest.raises(SalfError, match="--resume"):
        run_resumable(out)                                          # no silent overwrite
    resumed = run_resumable(out, resume=True)
    assert resumed["resumed_from_step"] == 2
    assert _comparable(resumed) == _comparable(ref_metrics)
    assert not any(p.name.startswith("tmp-") for p in (out / "checkpoints").iterdir())


def test_callback_applies_a_plan_inside_a_plain_trainer(tmp_path):
    """Users keeping their own Trainer: SalfFreezeCallback(plan) freezes at on_train_begin,
    after the Trainer has switched on checkpointing for every layer."""
    from transformers import Trainer, TrainingArguments

    from salf.data import collate, encode
    from salf.train import SalfFreezeCallback

    tok = tiny_tokenizer()
    task = SFTTask("Question: {prompt} Answer:")
    examples = encode(task, tok, [{"prompt": "How are you?", "response": "I am fine."}] * 8, 32)
    model = tiny_model("llama")
    anat = anatomy(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith(("model.embed_tokens", "model.layers.0", "model.layers.1"))}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], disable_tqdm=True, save_strategy="no",
                             remove_unused_columns=False, activation_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=lambda b: collate(b, tok.pad_token_id),
                      callbacks=[SalfFreezeCallback(make_plan(2))])
    trainer.train()
    assert [layer.gradient_checkpointing for layer in anat.layers] == [False, False, True, True]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(anat.layers[3].mlp.up_proj.weight, tiny_model("llama").model.layers[3].mlp.up_proj.weight)


def test_bf16_final_eval_is_what_the_saved_model_gives(tmp_path):
    """Mixed precision wraps the forward in autocast; the final evaluation must not keep it."""
    tok = tiny_tokenizer()
    metrics = train(tiny_model("llama"), tok, TASK, (rows(8), rows(8)), make_plan(2), tmp_path,
                    TrainConfig(max_steps=2, bf16=True, **COMMON))
    reloaded, _ = load_trained(tmp_path / "final")
    # bf16 autocast left on moves the loss by ~1e-2; a reload runs other kernels (~1e-7)
    assert evaluate(reloaded, tok, TASK, rows(8), 4, 32) == pytest.approx(metrics["eval"], rel=RELOAD_RTOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_cache_trains_the_same_model(tmp_path, family):
    """Skipping the frozen prefix (cached activations) gives the same losses and weights as
    running it (dropout off: the cache is built in eval mode); over 2 epochs the prefix runs
    only in the first one."""
    from salf.data import ClassificationTask
    from salf.models import tiny_model, tiny_tokenizer
    from salf.plan import FreezePlan
    from salf.train import train

    task = ClassificationTask("Review: {text}\nSentiment:", {"positive": " positive",
                                                             "negative": " negative"})
    rows = [{"text": f"{'good warm' if i % 2 else 'bad dull'} film {'!' * (i % 5)}",
             "label": "positive" if i % 2 else "negative"} for i in range(24)]
    results = {}
    for cached in (False, True):
        model = tiny_model(family, num_layers=4)
        if family == "gpt2":
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        plan = FreezePlan.manual(3, 4, model={"tied": True})
        layers = model.transformer.h if family == "gpt2" else model.model.layers
        calls = []
        real_forward = layers[0].forward
        layers[0].forward = lambda *a, **k: (calls.append(1), real_forward(*a, **k))[1]
        metrics = train(model, tiny_tokenizer(), task, (rows, []), plan, tmp_path / f"{family}-{cached}",
                        TrainConfig(epochs=2, batch_size=4, progress=False, cache_prefix=cached))
        results[cached] = ([p["loss"] for p in metrics["train"]["loss_curve"]],
                           {n: p.detach().clone() for n, p in model.named_parameters()})
        if cached:
            assert metrics["prefix_cache"]["examples"] == 24
            assert len(calls) == 6      # epoch 1 only (24 examples / batch 4)
        else:
            assert len(calls) == 12     # one per training step, 2 epochs
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    for name, p in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], p, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- console output, logs

def test_training_prints_a_bar_and_logs_every_step(tmp_path, capfd):
    metrics = train(tiny_model("llama"), tiny_tokenizer(), TASK, (rows(), rows(4)), make_plan(2), tmp_path,
                    TrainConfig(max_steps=4, lr=1e-2, eval_steps=2, save_steps=1, report_to="csv",
                                **{**COMMON, "progress": True}))
    out, err = capfd.readouterr()
    assert out == ""
    assert "train: 100%" in err and "s/step" in err and "loss" in err
    assert "step 2: eval" in err and "step 4: eval" in err
    assert "Writing model shards" not in err
    assert "{'loss'" not in err and "train_runtime" not in err        # no raw Trainer dicts

    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["step_s"] > 0 and r["tokens"] > 0 and r["learning_rate"] > 0 for r in steps)
    assert [r["loss"] for r in steps] == [p["loss"] for p in metrics["train"]["loss_curve"]]
    assert [r["step"] for r in log if "eval_loss" in r] == [2, 4]
    csv_lines = (tmp_path / "train_log.csv").read_text().splitlines()
    assert csv_lines[0] == "step,epoch,loss,learning_rate,grad_norm,step_s,tokens" and len(csv_lines) == 5
    # save_total_limit defaults to 2: four checkpoints written, the two newest kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_rotation_keeps_the_newest_and_the_resumed_checkpoint(tmp_path):
    from salf.train.checkpoints import rotate

    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-10", "checkpoint-5", "tmp-checkpoint-11",
                 "damaged-checkpoint-3"):
        (tmp_path / name).mkdir()
    deleted = rotate(tmp_path, 2, protect=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in deleted) == ["checkpoint-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10", "checkpoint-2", "checkpoint-5", "damaged-checkpoint-3", "tmp-checkpoint-11"]
    assert rotate(tmp_path, None) == []


# ---------------------------------------------------------------------------- damaged checkpoints

CKPT_RUN = dict(max_steps=4, lr=1e-2, save_steps=2, **COMMON)


def _ckpt_run(out, resume=False, callbacks=None):
    return train(tiny_model("llama"), tiny_tokenizer(), TASK, (rows(), rows(4)), make_plan(2), out,
                 TrainConfig(resume=resume, **CKPT_RUN), callbacks=callbacks)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished run (tied tiny Llama) with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    _ckpt_run(out)
    return out


def _copy_without_final(src, dst):
    import shutil

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    (dst / "metrics.json").unlink()
    return dst


def test_resuming_a_tied_model_does_not_warn_about_its_head(tmp_path, checkpointed, capfd, recwarn):
    import logging
    import shutil

    out = _copy_without_final(checkpointed, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    records = []
    handler = logging.Handler()
    handler.emit = records.append           # transformers logs to its own stderr handler
    logging.getLogger("transformers").addHandler(handler)
    try:
        metrics = _ckpt_run(out, resume=True)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert metrics["resumed_from_step"] == 2 and metrics["train"]["steps"] == 4
    messages = ([capfd.readouterr().err] + [str(w.message) for w in recwarn]
                + [r.getMessage() for r in records])
    assert not [m for m in messages if "lm_head" in m or "missing keys" in m], messages


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is damaged"),
    "broken trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, '),
                                  "trainer_state.json is not valid JSON"),
    "corrupt optimizer.pt": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt cannot be loaded"),
    "missing weights": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_skips_a_damaged_checkpoint_and_keeps_it(tmp_path, checkpointed, capfd, damage):
    out = _copy_without_final(checkpointed, tmp_path / "run")
    spoil, reason = DAMAGE[damage]
    spoil(out / "checkpoints" / "checkpoint-4")
    metrics = _ckpt_run(out, resume=True)
    assert metrics["resumed_from_step"] == 2 and metrics["train"]["steps"] == 4
    warnings = [line for line in capfd.readouterr().err.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and "checkpoint-4" in warnings[0] and reason in warnings[0], warnings
    assert "resuming from checkpoint-2" in warnings[0]
    # the damaged checkpoint is kept (set aside), the one resumed from too, a new checkpoint-4 written
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-2", "checkpoint-4", "damaged-checkpoint-4"]


def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path, checkpointed):
    out = _copy_without_final(checkpointed, tmp_path / "run")
    for name in ("checkpoint-2", "checkpoint-4"):
        (out / "checkpoints" / name / "rng_state.pth").unlink()
    with pytest.raises(SalfError, match=r"--resume: no checkpoint .*checkpoint-4 \(rng_state.pth is missing\)"
                                        r".*checkpoint-2 \(rng_state.pth is missing\)"):
        _ckpt_run(out, resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_resume_with_a_corrupt_run_json_is_one_clear_error(tmp_path, checkpointed):
    out = _copy_without_final(checkpointed, tmp_path / "run")
    (out / "run.json").write_text('{"plan": ')
    with pytest.raises(SalfError, match=r"^--resume: .*run\.json: not valid JSON"):
        _ckpt_run(out, resume=True)
    assert (out / "run.json").read_text() == '{"plan": '           # left for the user to repair


def test_resume_with_other_settings_names_them(tmp_path, checkpointed):
    out = _copy_without_final(checkpointed, tmp_path / "run")
    with pytest.raises(SalfError, match=r"--resume: .*other settings: lr 0\.01 \(now 0\.02\)"):
        train(tiny_model("llama"), tiny_tokenizer(), TASK, (rows(), rows(4)), make_plan(2), out,
              TrainConfig(resume=True, **{**CKPT_RUN, "lr": 2e-2}))


def test_cli_resume_from_a_damaged_run_is_one_line(tmp_path, capsys):
    from test_cli import _csv

    from salf.cli import main

    argv = ["train", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col", "review",
            "--label-col", "label", "--freeze-below", "2", "--max-steps", "2", "--save-steps", "1",
            "--batch-size", "4", "--eval-samples", "4", "--out", str(tmp_path / "t")]
    assert main(argv) == 0
    for ckpt in (tmp_path / "t" / "checkpoints").iterdir():
        _truncate(ckpt / "optimizer.pt")
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("salf: error: --resume: no checkpoint"), err
    assert "optimizer.pt cannot be loaded" in err[0]


# ---------------------------------------------------------------------------- callbacks' state

class CountingCallback(TrainerCallback):
    """A stateful callback as salf.train.extensions describes it."""

    salf_key = "counter"

    def __init__(self, every=1):
        self.every, self.steps, self.loaded = every, 0, None

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.steps = state["steps"]

    def run_settings(self):
        return {"every": self.every}

    def metrics_section(self):
        return {"steps": self.steps}


def test_callback_state_is_checkpointed_and_restored(tmp_path):
    import shutil

    out = tmp_path / "run"
    first = _ckpt_run(out, callbacks=[CountingCallback()])
    assert first["counter"] == {"steps": 4}
    assert json.loads((out / "checkpoints" / "checkpoint-2" / "salf_state.json").read_text()) == {
        "counter": {"steps": 2}}
    assert json.loads((out / "run.json").read_text())["callbacks"] == {"counter": {"every": 1}}

    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    with pytest.raises(SalfError, match=r"callbacks\.counter\.every 1 \(now 2\)"):
        _ckpt_run(out, resume=True, callbacks=[CountingCallback(every=2)])
    again = CountingCallback()
    resumed = _ckpt_run(out, resume=True, callbacks=[again])
    assert again.loaded == {"steps": 2} and resumed["counter"] == {"steps": 4}


# ---------------------------------------------------------------------------- Ctrl-C

class SigintAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_the_step_and_resume_matches_uninterrupted_run(tmp_path, reference, sigint_default):
    ref_metrics, ref_out = reference
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_resumable(out, callbacks=[SigintAt(3)])          # save_steps=2: step 3 is off-schedule
    assert last_checkpoint(out / "checkpoints").endswith("checkpoint-3")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # handler restored

    resumed = run_resumable(out, resume=True)
    assert resumed["resumed_from_step"] == 3
    assert _comparable(resumed) == _comparable(ref_metrics)
    a, b = _weights(ref_out / "final"), _weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_ctrl_c_stops_cleanly_with_a_resumable_checkpoint(tmp_path):
    from test_cli import _csv

    from salf.train.checkpoints import checkpoint_problem

    out = tmp_path / "t"
    proc = subprocess.Popen(
        [sys.executable, "-m", "salf", "train", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)),
         "--text-col", "review", "--label-col", "label", "--freeze-below", "2", "--max-steps", "5000",
         "--save-steps", "2", "--batch-size", "4", "--eval-samples", "4", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a Ctrl-C as from a terminal, also where pytest itself started with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while last_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "salf: interrupted" in err, err[-2000:]
    assert "stopping after this step" in err           # the first Ctrl-C only asked to stop
    newest = last_checkpoint(out / "checkpoints")
    assert checkpoint_problem(newest) is None
    assert not (out / "final").exists()


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it():
    from salf.train.interrupt import StopOnInterrupt

    stop = StopOnInterrupt()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop.catching_sigint():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with stop.catching_sigint():                  # a terminal's Ctrl-C: the step ends, then stop
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
    finally:
        signal.signal(signal.SIGINT, before)
