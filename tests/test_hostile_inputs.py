"""Cases from the hostile-input run (issue #22) on the CLI's checks, the data readers and the
prefix cache: each one line and exit 2 before any model loads where the flags decide it, or
the right result."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from datafiles import reviews_csv

from salf.config import TrainConfig
from salf.data import ClassificationTask
from salf.errors import SalfError
from salf.models.tiny import tiny_model, tiny_tokenizer
from salf.plan import FreezePlan, layer_span

COLS = ["--text-col", "review", "--label-col", "label"]


def _salf(*argv):
    return subprocess.run([sys.executable, "-m", "salf", *map(str, argv)], capture_output=True,
                          text=True)


def _fails(*argv, says: str, before_model: bool = True):
    """`salf ARGV` fails with one `salf: error:` line containing `says` (and, where the flags
    decide it, before any model loads: no 'plan:' line was printed)."""
    r = _salf(*argv)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("salf: error:"), r.stderr
    assert says in lines[-1], lines[-1]
    if before_model:
        assert len(lines) == 1 and "plan:" not in r.stdout, (r.stdout, r.stderr)
    return lines[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return reviews_csv(tmp_path_factory.mktemp("data"))


def _train(data, out, *extra):
    return ["train", "--model", "tiny-llama", "--dataset", data, *COLS, "--max-steps", "2",
            "--out", out, *extra]


# ---------------------------------------------------------------- 1: another verb's folder
def test_train_refuses_an_analysis_folder_and_analyze_a_train_folder(tmp_path, data):
    analysis = tmp_path / "a"
    analysis.mkdir()
    (analysis / "trace.json").write_text("{}")
    (analysis / "plan.json").write_text('{"eof": 1}')
    _fails(*_train(data, analysis, "--full"), says="holds the outputs of `salf analyze`")
    assert (analysis / "plan.json").read_text() == '{"eof": 1}'

    trained = tmp_path / "t"
    (trained / "final").mkdir(parents=True)
    (trained / "run.json").write_text("{}")
    (trained / "plan.json").write_text('{"eof": 2}')
    _fails("analyze", "--model", "tiny-llama", "--dataset", data, *COLS, "--out", trained,
           says="holds the outputs of `salf train`")
    assert (trained / "plan.json").read_text() == '{"eof": 2}'
    _fails("sweep", "--model", "tiny-llama", "--dataset", data, *COLS, "--out", trained,
           says="holds the outputs of `salf train`")


# ---------------------------------------------------------------- 6, 7, 11, 13, 16: flags
@pytest.mark.parametrize("seed", ["-1", "1099511627776"])
def test_a_seed_outside_numpys_range_is_refused(tmp_path, data, seed):
    _fails(*_train(data, tmp_path / "o", "--full", "--seed", seed), says="--seed must be")


def test_unknown_lora_targets_name_the_models_linear_modules(tmp_path, data):
    line = _fails(*_train(data, tmp_path / "o", "--freeze-below", "1", "--lora",
                          "--lora-targets", "q_proj,bogus_proj"), says="bogus_proj", before_model=False)
    assert "q_proj, up_proj, v_proj" in line and "q_proj," not in line.split(":")[2][:12]
    # finetune: before its analysis (no trace.json written)
    _fails("finetune", "--model", "tiny-llama", "--dataset", data, *COLS, "--lora",
           "--lora-targets", "bogus_proj", "--out", tmp_path / "ft", says="bogus_proj",
           before_model=False)
    assert not (tmp_path / "ft" / "analysis" / "trace.json").exists()


def test_lora_targets_accept_a_dotted_suffix():
    from salf.models import anatomy
    from salf.train.freeze import check_lora_targets

    anat = anatomy(tiny_model("llama"))
    check_lora_targets(anat, ["self_attn.q_proj", "down_proj"])
    with pytest.raises(SalfError, match="mlp.q_proj"):
        check_lora_targets(anat, ["mlp.q_proj"])


def test_deepest_cut_outside_its_range_is_refused(tmp_path, data):
    _fails(*_train(data, tmp_path / "o", "--freeze-below", "2", "--dynamic", "--deepest-cut", "0"),
           says="--deepest-cut must be at least the starting cut 2")
    # the model's depth is known once it loads: 4 layers, so at most 3
    for k in ("99", "4"):
        _fails(*_train(data, tmp_path / f"o{k}", "--freeze-below", "1", "--dynamic", "linear",
                       "--deepest-cut", k), says="must be in [1, 3]", before_model=False)


def test_deepest_cut_is_checked_against_the_model():
    from salf.dynamic.settings import DynamicSettings

    assert DynamicSettings(max_eof=3).deepest_cut(4, 1) == 3
    assert DynamicSettings().deepest_cut(4, 1) == 3
    with pytest.raises(SalfError, match=r"in \[2, 3\]"):
        DynamicSettings(max_eof=1).deepest_cut(4, 2)


def test_export_refuses_a_layers_path_that_is_not_a_dotted_name(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(FreezePlan.manual(2, 4, model={"model_type": "llama"}).to_dict()))
    _fails("export", "--plan", plan, "--format", "axolotl", "--layers-path", "model.(layers",
           says="--layers-path must be a dotted module path")
    r = _salf("export", "--plan", plan, "--format", "axolotl", "--layers-path", "base.layers")
    assert r.returncode == 0 and "^base.layers.2." in r.stdout, r.stderr


@pytest.mark.parametrize("extra, says", [
    (["--full", "--cache-prefix"], "--cache-prefix needs a cut"),
    (["--freeze-below", "1", "--cache-prefix", "--loss", "lm"], "'lm' loss"),
    (["--full", "--max-length", "1"], "--max-length must be at least 2"),
])
def test_flags_that_decide_a_refusal_cost_no_model_load(tmp_path, data, extra, says):
    _fails(*_train(data, tmp_path / "o", *extra), says=says)


def test_report_to_tensorboard_without_the_package_is_refused_first(tmp_path, data):
    import importlib.util

    if any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        pytest.skip("tensorboard is installed here")
    _fails(*_train(data, tmp_path / "o", "--full", "--report-to", "tensorboard"),
           says="needs the tensorboard package")


def test_a_probe_larger_than_the_data_is_refused_before_the_model_loads(tmp_path, data):
    _fails(*_train(data, tmp_path / "o", "--freeze-below", "1", "--dynamic", "--probe-rows",
                   "1000000000"), says="--probe-rows")
    _fails("finetune", "--model", "tiny-llama", "--dataset", data, *COLS, "--dynamic",
           "--probe-rows", "1000000000", "--out", tmp_path / "ft", says="--probe-rows",
           before_model=False)
    assert not (tmp_path / "ft" / "analysis").exists()


# ---------------------------------------------------------------- 14: data
def test_a_dict_valued_label_is_refused(tmp_path):
    from salf.data.files import build_from_records

    records = [{"text": f"t{i}", "label": {"x": 1} if i == 3 else "a"} for i in range(10)]
    with pytest.raises(SalfError, match=r"row 4, column 'label' holds a dict"):
        build_from_records(records, "d.jsonl")


def test_a_single_label_is_not_a_classification(tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("review,label\ngreat film,pos\n")
    _fails(*_train(one, tmp_path / "o", "--full"), says="at least two labels, found only 'pos'")


def test_training_without_validation_rows_says_so(tmp_path):
    small = tmp_path / "small.csv"
    small.write_text("review,label\n" + "".join(f"film {i},{'pos' if i % 2 else 'neg'}\n"
                                                for i in range(4)))
    r = _salf(*_train(small, tmp_path / "o", "--full", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr
    assert "has no validation rows: training without evaluation" in r.stderr
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["eval"] is None


def test_a_folder_that_is_not_a_saved_dataset_says_what_a_folder_must_be(tmp_path):
    (tmp_path / "d").mkdir()
    _fails("datasets", "show", tmp_path / "d", says="not a `datasets` save_to_disk folder")
    _fails(*_train(tmp_path / "d", tmp_path / "o", "--full"), says="save_to_disk")


def test_a_save_to_disk_folder_trains(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"review": [f"film {i}" for i in range(20)],
                                "label": ["pos", "neg"] * 10}).save_to_disk(str(tmp_path / "d"))
    r = _salf(*_train(tmp_path / "d", tmp_path / "o", "--full", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- 17: messages
def test_layer_ranges_read_as_words():
    from salf.dynamic import Check, DynamicSettings, RunShape, decide

    assert layer_span(2, 1) == "no layer" and layer_span(1, 1) == "layer 1"
    assert layer_span(2, 5) == "layers 2-5"
    one = FreezePlan.manual(1, 4, layers=[1, 3])
    assert one.describe().startswith("freeze embeddings + layer 1 of 4, train only layers 2, 4,")
    # autofreeze with the first trainable layer above the threshold: nothing under it
    run = RunShape(num_layers=4, total_steps=10, total_progress=10.0, max_eof=3)
    prev = Check(step=2, eof=2, progress=2.0, grad_norms=[1.0] * 4)
    now = Check(step=4, eof=2, progress=4.0, grad_norms=[1.0, 1.0, 0.1, 0.9])
    d = decide(DynamicSettings(policy="autofreeze"), [prev, now], run)
    assert d.eof == 2 and "no layer under it" in d.reason, d.reason


def test_an_error_after_a_progress_bar_starts_its_own_line(capsys):
    from tqdm.auto import tqdm

    from salf import cli

    bar = tqdm(total=3, file=sys.stderr)
    bar.update(1)
    cli._final_line("salf: error: boom")
    err = capsys.readouterr().err
    assert "\nsalf: error: boom\n" in err or err.startswith("salf: error: boom"), repr(err)


def test_only_rank_0_prints_the_error(monkeypatch, capsys):
    from salf import cli

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli._final_line("salf: error: boom")
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- 3: prefix cache
TASK = ClassificationTask("Review: {text} Sentiment:", {"pos": " positive", "neg": " negative"})
# The cache stores each row's prefix output from the batch the row first came in; a resumed
# run (empty cache) or an uncached run recomputes it in another batch, whose padding and
# kernel blocking round differently: equal to ~1e-8 here, not bit for bit (docs/training.md).
CACHE_ATOL = 1e-5


def _cache_run(out, resume=False):
    from salf.train import train

    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {'!' * (i % 5)}",
             "label": "pos" if i % 2 else "neg"} for i in range(24)]
    model = tiny_model("llama")
    metrics = train(model, tiny_tokenizer(), TASK, (rows, []), FreezePlan.manual(2, 4), out,
                    TrainConfig(max_steps=12, batch_size=4, max_length=32, lr=1e-2, save_steps=4, seed=0,
                                progress=False, cache_prefix=True, resume=resume))
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_resumed_prefix_cache_run_matches_the_uninterrupted_one_to_rounding(tmp_path):
    ref, ref_weights = _cache_run(tmp_path / "ref")
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", out)
    for name in ("final", "checkpoints/checkpoint-12"):
        shutil.rmtree(out / name)
    (out / "metrics.json").unlink()
    resumed, weights = _cache_run(out, resume=True)        # steps 9-12, the 2nd epoch, no cache
    assert resumed["resumed_from_step"] == 8
    assert [p["loss"] for p in resumed["train"]["loss_curve"]] == pytest.approx(
        [p["loss"] for p in ref["train"]["loss_curve"]], abs=CACHE_ATOL)
    for name, p in ref_weights.items():
        torch.testing.assert_close(weights[name], p, atol=CACHE_ATOL, rtol=1e-4)


# ---------------------------------------------------------------- 17: the resume mismatch
def test_a_resume_mismatch_names_only_the_fields_that_differ(tmp_path):
    from salf.train.loop import check_resume

    old = {"plan": {"eof": 2, "num_layers": 4, "head": "frozen"}, "lr": 0.01,
           "callbacks": {"dynamic": {"settings": {"tau": 0.2, "checks": 10}, "probe_rows": 16}}}
    new = {"plan": {"eof": 1, "num_layers": 4, "head": "frozen"}, "lr": 0.01,
           "callbacks": {"dynamic": {"settings": {"tau": 0.3, "checks": 10}, "probe_rows": 16}}}
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(SalfError) as err:
        check_resume(tmp_path / "run.json", new, ("plan", "lr", "callbacks"))
    message = str(err.value)
    assert "plan.eof 2 (now 1); callbacks.dynamic.settings.tau 0.2 (now 0.3)" in message
    assert "num_layers" not in message and "checks" not in message and len(message) < 300
