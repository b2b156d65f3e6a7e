"""Resume and output writing against hostile leftovers (issue #22): a run resumed at its last
step, a run folder without run.json, damaged callback states, a full disk."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import test_train
import torch
from safetensors import SafetensorError
from test_train import (CKPT_RUN, RELOAD_RTOL, TASK, _ckpt_run, _copy_without_final, _truncate, _weights,
                        make_plan, rows)
from transformers import TrainerCallback

from salf.config import TrainConfig
from salf.dynamic import DynamicSettings, moving_cut
from salf.errors import SalfError
from salf.io import disk_full_is_an_error
from salf.models.tiny import tiny_model, tiny_tokenizer
from salf.train import train
from salf.train.checkpoints import STATE_FILE, TENSOR_FILE, checkpoint_problem, last_checkpoint

checkpointed = test_train.checkpointed   # its finished run (checkpoint-2, checkpoint-4), a fixture here too


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _loss_rows(out):
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


# ---------------------------------------------------------------------------- 2: resume at the last step

@pytest.mark.parametrize("left", ["finished", "killed after its final checkpoint"])
def test_a_run_resumed_at_its_last_step_trains_no_further_step(tmp_path, checkpointed, left):
    """The Trainer looks for the end only after a step: resumed from checkpoint-4 of a 4-step
    run it trained a 5th (at lr 0), saved checkpoint-5 and reported another final loss."""
    if left == "finished":
        out = shutil.copytree(checkpointed, tmp_path / "run")
    else:   # SIGKILL once checkpoint-4 was published: no final/, no metrics.json
        out = _copy_without_final(checkpointed, tmp_path / "run")
    whole = json.loads((checkpointed / "metrics.json").read_text())

    resumed = _ckpt_run(out, resume=True)
    assert resumed["resumed_from_step"] == 4 and resumed["train"]["steps"] == 4
    # the logged numbers come back from the checkpoint's JSON unchanged
    assert resumed["train"]["loss_curve"] == whole["train"]["loss_curve"]
    assert resumed["train"]["final_loss"] == whole["train"]["final_loss"]
    assert resumed["eval_curve"] == whole["eval_curve"]
    assert resumed["eval"] == pytest.approx(whole["eval"], rel=RELOAD_RTOL)   # weights reloaded
    assert json.loads((out / "metrics.json").read_text())["train"]["loss_curve"] == whole["train"]["loss_curve"]
    assert len(_loss_rows(out)) == 4
    assert _names(out / "checkpoints") == ["checkpoint-2", "checkpoint-4"]
    a, b = _weights(checkpointed / "final"), _weights(out / "final")     # loaded and saved, not trained
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


class _KillAfterSaving(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):   # called once the checkpoint is published
        if state.global_step == self.step:
            raise _Killed


def test_a_sweep_cell_killed_at_its_final_checkpoint_resumes_to_the_same_record(tmp_path, monkeypatch):
    from test_sweep import one_thread, stop_a_cell

    from salf.sweep import run_cell

    with one_thread():
        cfg, whole, spec = stop_a_cell(tmp_path, monkeypatch, 4, _KillAfterSaving(4), _Killed)
        work = tmp_path / "stopped" / f".work-{spec['key']}"
        assert last_checkpoint(work / "checkpoints").endswith("checkpoint-4")
        assert not (work / "metrics.json").exists()
        again = run_cell(spec)
    assert again["resumed_from_step"] == 4
    assert len(again["train_loss_curve"]) == len(whole["train_loss_curve"]) == cfg.steps
    assert again["train_loss_curve"] == pytest.approx(whole["train_loss_curve"], abs=1e-6)
    assert again["final_train_loss"] == pytest.approx(whole["final_train_loss"], abs=1e-6)
    assert again["loss"] == pytest.approx(whole["loss"], rel=1e-6)


# ---------------------------------------------------------------------------- 4: run.json deleted

def test_resume_without_run_json_is_refused_in_one_line(tmp_path, capsys):
    """Without run.json nothing says which settings wrote the checkpoints: a resume with
    another --lr kept the checkpoint's schedule but recorded the new lr."""
    from test_cli import _csv

    from salf.cli import main

    out = tmp_path / "t"
    argv = ["train", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col", "review",
            "--label-col", "label", "--freeze-below", "2", "--max-steps", "4", "--save-steps", "2",
            "--batch-size", "4", "--eval-samples", "4", "--out", str(out)]
    assert main(argv + ["--lr", "5e-3"]) == 0
    _copy_without_final(out, tmp_path / "copy")
    (tmp_path / "copy" / "run.json").unlink()
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "copy"), "--lr", "1e-3", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("salf: error: --resume: "), err
    assert "run.json is missing" in err[0] and "cannot be checked" in err[0]
    assert not (tmp_path / "copy" / "run.json").exists() and not (tmp_path / "copy" / "metrics.json").exists()
    assert _names(tmp_path / "copy" / "checkpoints") == ["checkpoint-2", "checkpoint-4"]


# ---------------------------------------------------------------------------- 5: damaged callback states

def _dynamic_run(out, resume=False):
    """A dynamic run whose probe keeps tensors (salf_tensors.safetensors in each checkpoint)."""
    return train(tiny_model("llama"), tiny_tokenizer(), TASK, (rows(), rows(4)), make_plan(1), out,
                 TrainConfig(resume=resume, **CKPT_RUN),
                 callbacks=[moving_cut(DynamicSettings(policy="static", checks=2), TASK,
                                                      tiny_tokenizer(), rows(4), out_dir=out,
                                                      max_length=CKPT_RUN["max_length"])])


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic") / "run"
    _dynamic_run(out)
    return out


def _history_a_string(ckpt):
    state = json.loads((ckpt / STATE_FILE).read_text())
    state["dynamic"]["history"] = "not a list"
    (ckpt / STATE_FILE).write_text(json.dumps(state))


CALLBACK_DAMAGE = {
    "truncated tensors": (lambda c: _truncate(c / TENSOR_FILE), f"{TENSOR_FILE} is damaged"),
    "history a string": (_history_a_string, f"{STATE_FILE} does not load (TypeError"),
}


@pytest.mark.parametrize("damage", CALLBACK_DAMAGE)
def test_dynamic_resume_skips_a_damaged_callback_state(tmp_path, dynamic_run, capfd, damage):
    out = _copy_without_final(dynamic_run, tmp_path / "run")
    newest = out / "checkpoints" / "checkpoint-4"
    assert (newest / TENSOR_FILE).is_file()
    spoil, reason = CALLBACK_DAMAGE[damage]
    spoil(newest)
    capfd.readouterr()
    resumed = _dynamic_run(out, resume=True)
    assert resumed["resumed_from_step"] == 2 and resumed["train"]["steps"] == 4
    warnings = [line for line in capfd.readouterr().err.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and reason in warnings[0] and "resuming from checkpoint-2" in warnings[0], warnings
    assert _names(out / "checkpoints") == ["checkpoint-2", "checkpoint-4", "damaged-checkpoint-4"]
    whole = json.loads((dynamic_run / "metrics.json").read_text())
    assert resumed["dynamic"]["schedule"] == whole["dynamic"]["schedule"]
    assert [c["step"] for c in resumed["dynamic"]["checks"]] == [c["step"] for c in whole["dynamic"]["checks"]]


# ---------------------------------------------------------------------------- 8: a full disk

# what the writers raise when the disk fills up (seen on a full tmpfs)
FULL_DISK = {
    "OSError": OSError(errno.ENOSPC, "No space left on device"),
    "torch.save stream": RuntimeError("basic_ios::clear: iostream error"),
    "torch.save position": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
}


@pytest.mark.parametrize("error", FULL_DISK)
def test_a_full_disk_is_one_error_naming_the_path(tmp_path, error):
    with (pytest.raises(SalfError, match=r"^cannot write .*x\.bin: no space left on device") as raised,
          disk_full_is_an_error(tmp_path / "x.bin")):
        raise FULL_DISK[error]
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("other", [OSError(errno.EACCES, "Permission denied"), RuntimeError("CUDA error"),
                                   SafetensorError("Error while serializing: tensor is not contiguous")])
def test_other_write_errors_pass_unchanged(tmp_path, other):
    with pytest.raises(type(other)) as raised, disk_full_is_an_error(tmp_path / "x.bin"):
        raise other
    assert raised.value is other


@pytest.mark.parametrize("error", ["OSError", "torch.save stream"])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise FULL_DISK[error]
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(SalfError, match=r"^cannot write \S*checkpoints/checkpoint-4: no space left on device"):
        _ckpt_run(out)
    assert _names(out / "checkpoints") == ["checkpoint-2"]          # nothing partial left, nothing replaced
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-2") is None
    assert not (out / "metrics.json").exists()


def test_a_full_disk_while_saving_the_final_model_leaves_no_partial_one(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        if ".tmp-final" in str(folder):
            raise FULL_DISK["safetensors"]
        return real_save(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    out = tmp_path / "run"
    with pytest.raises(SalfError, match=r"^cannot write \S*run/final: no space left on device"):
        _ckpt_run(out)
    assert "final" not in _names(out) and ".tmp-final" not in _names(out)
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-4") is None     # resumable


def test_a_full_disk_while_analyze_draws_its_plot_leaves_the_report(tmp_path, capsys, monkeypatch):
    """trace.json, plan.json and report.md are written before the (larger) plot; its failure
    is one line and leaves no partial trace.png."""
    from matplotlib.figure import Figure
    from test_cli import _csv

    from salf.cli import main

    def savefig(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")   # as savefig raises it: no file name

    monkeypatch.setattr(Figure, "savefig", savefig)
    out = tmp_path / "a"
    assert main(["analyze", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col", "review",
                 "--label-col", "label", "--samples", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower()]        # the others: the trace's bar
    assert errors == err[-1:], err
    assert err[-1].startswith(f"salf: error: cannot write {out / 'trace.png'}: no space left on device"), err
    assert _names(out) == ["plan.json", "report.md", "trace.json"]
    assert "## The cut" in (out / "report.md").read_text()
