"""End-to-end CLI behaviour on tiny models and small local files: outputs exist, errors are one line."""

import json
import subprocess
import sys

import pytest
from datafiles import reviews_csv

from salf.cli import main


def _csv(tmp_path, n=60):
    return reviews_csv(tmp_path, n)


def _sft(tmp_path, n=40):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"What is {i} plus one?", "a": f"It is {i + 1}."})
                              for i in range(n)) + "\n")
    return path


def _run(*argv):
    r = subprocess.run([sys.executable, "-m", "salf", *map(str, argv)], capture_output=True,
                       text=True)
    return r


def test_help_reads_like_a_manual(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("analyze", "plan", "train", "evaluate", "finetune", "sweep", "models", "datasets"):
        assert verb in out
    for verb in ("analyze", "train", "sweep"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "example" in capsys.readouterr().out


def test_analyze_then_replan_then_train_with_plan(tmp_path):
    data = _csv(tmp_path)
    out = tmp_path / "a"
    assert main(["analyze", "--model", "tiny-llama", "--dataset", str(data), "--text-col", "review",
                 "--label-col", "label", "--samples", "16", "--out", str(out)]) == 0
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["spaces"]) == 5 and trace["num_layers"] == 4
    plan = json.loads((out / "plan.json").read_text())
    assert 0 <= plan["eof"] <= 3
    assert plan["policy"] == "max-gain-e0"          # the default the sweep chose (salf.defaults)
    assert (out / "trace.png").stat().st_size > 10_000
    assert "## The cut" in (out / "report.md").read_text()
    assert main(["plan", "--trace", str(out / "trace.json"), "--policy", "paper",
                 "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["policy"] == "paper"
    t = tmp_path / "t"
    assert main(["train", "--model", "tiny-llama", "--dataset", str(data), "--text-col", "review",
                 "--label-col", "label", "--plan", str(out / "plan.json"), "--max-steps", "3",
                 "--batch-size", "4", "--eval-samples", "8", "--out", str(t)]) == 0
    metrics = json.loads((t / "metrics.json").read_text())
    assert metrics["audit"]["ok"] and metrics["train"]["steps"] == 3
    ev = tmp_path / "ev.json"
    assert main(["evaluate", "--model", str(t / "final"), "--dataset", str(data), "--text-col",
                 "review", "--label-col", "label", "--split", "validation", "--samples", "8",
                 "--out", str(ev)]) == 0
    again = json.loads(ev.read_text())
    for key in ("accuracy", "macro_f1", "loss", "label_loss", "n"):  # reloaded == recorded
        assert again[key] == pytest.approx(metrics["eval"][key], rel=1e-5, abs=1e-6), key


def test_sft_analysis_on_a_local_jsonl(tmp_path):
    out = tmp_path / "s"
    assert main(["analyze", "--model", "tiny-gpt2", "--dataset", str(_sft(tmp_path)),
                 "--prompt-col", "q", "--response-col", "a", "--samples", "12",
                 "--out", str(out)]) == 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["task"] == "sft" and all(s["deviation"] is not None for s in trace["spaces"])


@pytest.mark.parametrize("argv, message", [
    (["analyze", "--model", "tiny-llama", "--dataset", "{csv}", "--text-col", "nope",
      "--label-col", "label", "--out", "{tmp}/x"], "nope"),
    (["analyze", "--model", "tiny-llama", "--dataset", "{csv}", "--text-col", "review",
      "--label-col", "label", "--samples", "0", "--out", "{tmp}/x"], "--samples must be at least 1"),
    (["train", "--model", "tiny-llama", "--dataset", "{csv}", "--text-col", "review",
      "--label-col", "label", "--freeze-below", "9", "--out", "{tmp}/x"], "outside"),
    (["plan", "--trace", "{tmp}/missing.json"], "does not exist"),
    (["analyze", "--model", "no-such-model", "--dataset", "{csv}", "--out", "{tmp}/x"],
     "unknown model"),
    (["analyze", "--model", "tiny-llama", "--dataset", "{tmp}/empty.csv", "--out", "{tmp}/x"],
     "empty"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, argv, message):
    (tmp_path / "empty.csv").write_text("review,label\n")
    csv = _csv(tmp_path)
    argv = [a.replace("{csv}", str(csv)).replace("{tmp}", str(tmp_path)) for a in argv]
    r = _run(*argv)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("salf: error")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_plan_for_another_model_is_refused(tmp_path):
    data = _csv(tmp_path)
    out = tmp_path / "a"
    main(["analyze", "--model", "tiny-llama", "--dataset", str(data), "--text-col", "review",
          "--label-col", "label", "--samples", "8", "--out", str(out)])
    r = _run("train", "--model", "tiny-gpt2", "--dataset", data, "--text-col", "review",
             "--label-col", "label", "--plan", out / "plan.json", "--out", tmp_path / "t")
    assert r.returncode == 2 and "salf: error" in r.stderr


def test_nan_hidden_states_are_reported(tmp_path):
    import torch

    from salf.errors import SalfError
    from salf.models import load_model
    from salf.pipeline import analyze

    model, tok, info = load_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))  # a broken checkpoint
    with pytest.raises(SalfError, match="NaN"):
        analyze("tiny-llama", str(_csv(tmp_path)), samples=8, loaded=(model, tok, info),
                data_kwargs={"text_col": "review", "label_col": "label"}, progress=False)


def test_train_keeps_the_newest_checkpoints_and_logs_csv(tmp_path):
    t = tmp_path / "t"
    assert main(["train", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col",
                 "review", "--label-col", "label", "--freeze-below", "2", "--max-steps", "3",
                 "--save-steps", "1", "--save-total-limit", "1", "--report-to", "csv",
                 "--batch-size", "4", "--eval-samples", "0", "--out", str(t)]) == 0
    kept = sorted(p.name for p in (t / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-3"]
    header, *rows = (t / "train_log.csv").read_text().splitlines()
    assert "loss" in header and len(rows) == 3
