"""`salf sweep` on a tiny model with 2 cuts: schema, frontier, picks, resumability."""

import contextlib
import json
import os

import pytest

from salf.cli import main
from salf.defaults import DEFAULT_POLICY
from salf.sweep import write_sweep_report


def _csv(tmp_path, n=80):
    path = tmp_path / "d.csv"
    rows = ["text,label"] + [f"{'lovely bright' if i % 2 else 'awful grim'} film {i},"
                             f"{'positive' if i % 2 else 'negative'}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_tiny_sweep_schema_and_resume(tmp_path, capsys, monkeypatch, bench_module):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col", "text",
            "--label-col", "label", "--cuts", "1,3", "--selectors", "salf,paper,freeze-half",
            "--seeds", "1", "--budget-steps", "2", "--batch-size", "4", "--test-samples", "8",
            "--samples", "8", "--out", str(out)]
    assert main(argv) == 0
    s = json.loads((out / "sweep.json").read_text())
    assert s["model"] == "tiny-llama" and s["metric"] == "accuracy"
    assert s["full"]["cost"] == 1.0 and 0 <= s["full"]["quality"] <= 1
    full_cells = [c for c in s["cells"] if c["selector"] == "full"]
    assert len(full_cells) == 1 and full_cells[0]["cut"] is None
    cut_cells = {c["cut"] for c in s["cells"] if c["selector"] is None}
    assert {1, 3} <= cut_cells
    for c in s["cells"]:
        assert {"cut", "selector", "seed", "quality", "loss", "cost", "step_s", "peak_mb"} <= set(c)
        assert c["audit_ok"] and c["test_rows"] == 8
        assert len(c["train_loss_curve"]) == 2    # one loss per optimizer step
    costs = {c["cut"]: c["cost"] for c in s["cells"] if c["cut"] is not None}
    assert costs[3] < costs[1] < 1.0
    # `salf` is the default policy, named after it; sweep.json says which row it is
    assert set(s["picks"]) == {DEFAULT_POLICY, "paper", "freeze-half"}
    assert s["picks"]["freeze-half"] == 2 and s["default_selector"] == DEFAULT_POLICY
    assert (out / "frontier.png").stat().st_size > 10_000 and (out / "sweep.md").exists()

    # resume: a finished cell is never recomputed, a missing one is; the baseline
    # selectors' picks are read back from analysis/picks.json, not recomputed
    cells = out / "cells"
    kept = cells / "cut01-s1.json"
    before = kept.stat().st_mtime_ns
    (cells / "cut03-s1.json").unlink()
    saved = json.loads((out / "analysis" / "picks.json").read_text())
    assert saved["picks"]["freeze-half"]["cut"] == 2 and DEFAULT_POLICY not in saved["picks"]

    def no_selector(*a, **k):
        raise AssertionError("a saved pick was recomputed")

    monkeypatch.setattr("salf.selectors.run_selector", no_selector)
    assert main(argv) == 0
    assert kept.stat().st_mtime_ns == before
    assert (cells / "cut03-s1.json").exists()

    # --report-only rebuilds the summary from the cells on disk without training (and fills
    # test_rows into cells written before it was recorded)
    (out / "sweep.md").unlink()
    old = json.loads(kept.read_text())
    del old["test_rows"]
    kept.write_text(json.dumps(old))
    # a layer-set cell from before set costs counted only the trained layers: charged as
    # its lowest layer's prefix (cost of cut 1); --report-only recomputes it
    from salf.cost import ModelShape, StepSettings, layer_set_cost
    from salf.models import load_model

    assert old["cost_basis"] == "trained-layers"
    legacy = {k: v for k, v in old.items() if k != "cost_basis"}
    (cells / "set-1_3-s1.json").write_text(json.dumps(dict(legacy, key="set-1_3-s1", cut=None,
                                                           layers=[1, 3], selector="spectrum")))
    assert main(argv + ["--report-only"]) == 0
    fixed = json.loads((cells / "set-1_3-s1.json").read_text())
    want = layer_set_cost(ModelShape.from_model(load_model("tiny-llama")[0]), [1, 3],
                          StepSettings(96, 4, loss_positions="last"))["flops_ratio"]
    assert fixed["cost_basis"] == "trained-layers" and fixed["cost"] == pytest.approx(want)
    assert costs[3] < fixed["cost"] < costs[1]
    (cells / "set-1_3-s1.json").unlink()
    assert main(argv + ["--report-only"]) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again["full"]["quality"] == s["full"]["quality"] and (out / "sweep.md").exists()
    assert again["oracle"]["noise"] >= again["full"]["spread"]
    assert json.loads(kept.read_text())["test_rows"] == 8

    # bench/sweep_cells.py adds chosen cells at another seed, with the same settings
    sweep_cells = bench_module("sweep_cells")
    assert sweep_cells.main([str(out), "full-s2", "cut03-s2"]) == 0
    more = json.loads((out / "sweep.json").read_text())
    pts = {p["cut"]: p for p in more["cuts"]}
    assert more["seeds"] == [1, 2] and more["full"]["seeds"] == 2
    assert pts[3]["paired_seeds"] == [1, 2] and pts[1]["paired_seeds"] == [1]
    assert not (cells / "cut01-s2.json").exists()

    # bench/sweep_verdict.py publishes OUT.json and prints the tables and the targets
    capsys.readouterr()
    assert bench_module("sweep_verdict").main([str(out), "--number", "4", "--judge", "salf"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text()) == more
    assert "### 4.1 tiny-llama on" in printed and f"- {DEFAULT_POLICY} (default, eof " in printed
    assert f"| {DEFAULT_POLICY} (default) |" in printed


def test_sweep_refuses_other_settings_in_the_same_folder(tmp_path, capsys):
    out = tmp_path / "sweep"
    (out).mkdir()
    (out / "config.json").write_text(json.dumps({"training": {"steps": 999}}))
    rc = main(["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col",
               "text", "--label-col", "label", "--cuts", "1", "--out", str(out)])
    assert rc == 2 and "other training settings" in capsys.readouterr().err


def _cell(cut, loss, seed=1, selector=None, loss_se=None):
    return {"key": f"c{cut}-{seed}", "cut": cut, "layers": None, "selector": selector,
            "seed": seed, "quality": loss, "loss": loss, "accuracy": None, "cost": 1.0 if cut is
            None else 1.0 - cut / 10, "step_s": 1.0, "peak_mb": 1.0, "loss_se": loss_se}


def test_loss_sweep_with_one_seed_uses_the_test_row_standard_error():
    from salf.sweep import SweepConfig, summarize

    cfg = SweepConfig(model="m", dataset="d", out="o", test_samples=100)
    cells = [_cell(None, 2.000, selector="full", loss_se=0.05),
             _cell(2, 2.015), _cell(5, 2.030), _cell(8, 2.500)]
    s = summarize(cfg, cells, {"max-gain": {"cut": 5}}, {})
    assert s["metric"] == "loss" and s["oracle"]["noise"] == 0.05
    safe = {p["cut"]: p["safe"] for p in s["cuts"]}
    # within the SE and within 1%: safe; within the SE but 1.5% worse: not; far worse: not
    assert safe == {2: True, 5: False, 8: False}
    assert s["oracle"]["cheapest_safe_cut"] == 2 and s["pick_details"]["max-gain"]["safe"] is False
    # without an SE (older cells) one seed leaves no noise allowance at all
    s0 = summarize(cfg, [dict(c, loss_se=None) for c in cells], {}, {})
    assert s0["oracle"]["noise"] == 0.0 and not any(p["safe"] for p in s0["cuts"])


def test_accuracy_noise_uses_the_rows_actually_evaluated():
    from salf.sweep import SweepConfig, summarize

    cfg = SweepConfig(model="m", dataset="d", out="o", test_samples=1000)
    full = dict(_cell(None, 0.9, selector="full"), accuracy=0.9, test_rows=100)
    s = summarize(cfg, [full], {}, {})
    assert s["metric"] == "accuracy"
    assert abs(s["oracle"]["noise"] - (0.9 * 0.1 / 100) ** 0.5) < 1e-12   # not / 1000


def test_a_cut_is_compared_with_full_at_the_seeds_they_share():
    from salf.sweep import SweepConfig, summarize

    cfg = SweepConfig(model="m", dataset="d", out="o", test_samples=1000)

    def acc(cut, q, seed, selector=None):
        return dict(_cell(cut, q, seed=seed, selector=selector), accuracy=q, test_rows=1000)

    cells = [acc(None, 0.90, 1, "full"), acc(None, 0.80, 2, "full"),
             acc(4, 0.87, 1),                      # one seed: judged against full's seed 1 only
             acc(6, 0.895, 1), acc(6, 0.80, 2)]    # both seeds: against full's mean
    s = summarize(cfg, cells, {}, {})
    pts = {p["cut"]: p for p in s["cuts"]}
    assert s["seeds"] == [1, 2] and s["full"]["seeds"] == 2
    assert pts[4]["paired_seeds"] == [1] and abs(pts[4]["delta_vs_full"] + 0.03) < 1e-12
    # 0.87 beats full's two-seed mean (0.85) but is 3.3% below full at the same seed
    assert pts[4]["safe"] is False
    assert abs(pts[6]["delta_vs_full"] + 0.0025) < 1e-12 and pts[6]["safe"] is True
    assert s["oracle"]["cheapest_safe_cut"] == 6

    # a selector's layer set (Spectrum) is judged the same way: paired, with a verdict
    spectrum = dict(acc(None, 0.89, 1), key="set-0_3-s1", layers=[0, 3], selector="spectrum",
                    cost=0.5)
    s = summarize(cfg, cells + [spectrum], {"spectrum": {"layers": [0, 3]}}, {})
    d = s["pick_details"]["spectrum"]
    assert d["paired_seeds"] == [1] and abs(d["delta_vs_full"] + 0.01) < 1e-12
    assert d["safe"] is False and d["cost_vs_cheapest_safe"] == 0.5 / pts[6]["cost"]


def test_cell_names_round_trip_and_bad_names_are_refused():
    from salf.errors import SalfError
    from salf.sweep import cell_key, parse_cell_key

    for cut, layers, seed in [(None, None, 2), (4, None, 1), (29, None, 3), (None, [0, 1, 18], 1)]:
        item = {"cut": cut, "layers": layers, "seed": seed}
        assert parse_cell_key(cell_key(item)) == item
    assert [cell_key(dict(cut=4, layers=None, seed=1)), cell_key(dict(cut=None, layers=[0, 18],
                                                                      seed=2))] == ["cut04-s1", "set-0_18-s2"]
    for bad in ["cut4", "full", "cut04-s", "set--s1", "set-1_-s1", "cut04-s1.json"]:
        with pytest.raises(SalfError, match="is not full-sN"):
            parse_cell_key(bad)


def test_sweep_cells_names_a_pick_cell_after_its_selector(tmp_path, bench_module):
    """A set cell or a pick outside the grid, run by name, keeps its selector's name."""
    from salf.sweep import SweepConfig

    (tmp_path / "cells").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({"pick_details": {
        "spectrum": {"layers": [0, 1, 3]}, "paper": {"cut": 1}, "freeze-half": {"cut": 2}}}))
    cfg = SweepConfig(model="tiny-llama", dataset="d", out=str(tmp_path), cuts=[2, 3])
    spec = bench_module("sweep_cells").named_cell_spec
    s = spec(cfg, tmp_path, "set-0_1_3-s2")
    assert (s["layers"], s["cut"], s["selector"], s["seed"]) == ([0, 1, 3], None, "spectrum", 2)
    assert spec(cfg, tmp_path, "cut01-s3")["selector"] == "paper"
    assert spec(cfg, tmp_path, "cut02-s3")["selector"] is None   # a grid cut, not a pick's cell
    assert spec(cfg, tmp_path, "full-s3")["selector"] == "full"


def test_sweep_cells_runs_a_dynamic_cell_at_another_seed_from_its_pick(tmp_path, bench_module):
    """dyn-... cells by name: the start cut and settings of the dynamic pick in sweep.json
    (what `salf sweep --seeds N` would train, without the full fine-tuning it adds)."""
    from salf.errors import SalfError
    from salf.sweep import SweepConfig

    (tmp_path / "cells").mkdir()
    budget = {"policy": "salf-budget", "guard": False}
    (tmp_path / "sweep.json").write_text(json.dumps({"pick_details": {
        "paper": {"cut": 1}, "dyn-salf": {"cut": 2, "dynamic": {"policy": "salf"}},
        "dyn-salf-budget:guard=false": {"cut": 2, "dynamic": budget}}}))
    cfg = SweepConfig(model="tiny-llama", dataset="d", out=str(tmp_path), cuts=[2, 3])
    spec = bench_module("sweep_cells").named_cell_spec
    s = spec(cfg, tmp_path, "dyn-salf-budget-guard=false-s3")
    assert (s["cut"], s["selector"], s["seed"], s["dynamic"]) == (2, "dyn-salf-budget:guard=false", 3, budget)
    assert s["key"] == "dyn-salf-budget-guard=false-s3"
    assert spec(cfg, tmp_path, "dyn-salf-s2")["dynamic"] == {"policy": "salf"}
    with pytest.raises(SalfError, match="no dynamic pick"):
        spec(cfg, tmp_path, "dyn-linear-s2")


def test_a_narrower_rerun_adds_to_the_folder_and_drops_nothing(tmp_path, capsys):
    """Rerunning with other --cuts/--selectors trains only what it names, and the folder's
    config and report keep every earlier cell and pick."""
    out = tmp_path / "sweep"
    base = ["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col",
            "text", "--label-col", "label", "--budget-steps", "2", "--batch-size", "4",
            "--test-samples", "8", "--samples", "8", "--out", str(out)]
    assert main(base + ["--cuts", "1", "--selectors", "freeze-half"]) == 0
    first = {c["key"] for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert first == {"full-s1", "cut01-s1", "cut02-s1"}
    capsys.readouterr()
    # --cuts none: full and the selectors' picks only (freeze-half's eof 2), no grid cut
    assert main(base + ["--cuts", "none", "--selectors", "freeze-half", "--dry-run"]) == 0
    assert "2 of the 2 cells asked for are done" in capsys.readouterr().out
    assert main(base + ["--cuts", "3", "--selectors", "freeze-half", "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "2 of the 3 cells asked for are done; 1 to train: cut03-s1" in said
    assert not (out / "cells" / "cut03-s1.json").exists()
    assert json.loads((out / "config.json").read_text())["config"]["cuts"] == [1]

    assert main(base + ["--cuts", "3", "--selectors", "paper"]) == 0
    s = json.loads((out / "sweep.json").read_text())
    assert first | {"cut03-s1"} <= {c["key"] for c in s["cells"]}
    assert {"freeze-half", "paper"} <= set(s["picks"])
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["cuts"] == [1, 3] and cfg["selectors"] == ["freeze-half", "paper"]


def test_parallel_cells_match_sequential_ones(tmp_path):
    """--jobs 2 runs cells side by side; each cell is the same training run as with --jobs 1."""
    base = ["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col",
            "text", "--label-col", "label", "--cuts", "3", "--selectors", "freeze-half",
            "--budget-steps", "2", "--batch-size", "4", "--test-samples", "8", "--samples", "8"]
    assert main(base + ["--out", str(tmp_path / "seq")]) == 0
    assert main(base + ["--jobs", "3", "--out", str(tmp_path / "par")]) == 0
    seq, par = ({c["key"]: c for c in json.loads((tmp_path / d / "sweep.json").read_text())["cells"]}
                for d in ("seq", "par"))
    assert set(seq) == set(par) == {"full-s1", "cut02-s1", "cut03-s1"}
    for key in seq:
        assert par[key]["loss"] == pytest.approx(seq[key]["loss"], rel=1e-4, abs=1e-5)
        assert par[key]["train_loss_curve"] == pytest.approx(seq[key]["train_loss_curve"], abs=1e-4)


def test_parallel_cells_keep_finished_work_when_one_fails(tmp_path, monkeypatch):
    import time

    import salf.sweep.runner as sweep

    started, kept = [], []

    def fake_cell(spec, cells_dir, timeout_s, env_extra=None):
        started.append((spec["key"], env_extra))
        if spec["key"] == "bad":
            raise sweep.SalfError("sweep cell bad failed: boom")
        time.sleep(0.3)  # the failure is seen while this one still runs
        return {"key": spec["key"]}

    monkeypatch.setattr(sweep, "run_cell_subprocess", fake_cell)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("SALF_THREADS", raising=False)
    specs = [{"key": k} for k in ("a", "bad", "c", "d", "e")]
    with pytest.raises(sweep.SalfError, match="boom"):
        sweep.run_cells(specs, tmp_path, 10, 2, lambda done: kept.append(done["key"]))
    # the cell running beside the failure is kept; nothing new starts after the failure
    assert kept == ["a"] and [k for k, _ in started] == ["a", "bad"]
    gpus = {env["CUDA_VISIBLE_DEVICES"] for _, env in started}
    assert gpus == {"0", "1"} and all(int(env["SALF_THREADS"]) >= 1 for _, env in started)


def test_sweep_refuses_an_unknown_selector_before_training(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col",
               "text", "--label-col", "label", "--cuts", "1", "--selectors", "salf,nope",
               "--out", str(out)])
    assert rc == 2 and "unknown selector 'nope'" in capsys.readouterr().err
    assert not list((out / "cells").glob("*.json"))
    # the names older sweeps gave SALF's policies are refused with the new one
    rc = main(["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col",
               "text", "--label-col", "label", "--selectors", "salf-e0", "--out", str(out)])
    assert rc == 2 and "'salf-e0' is now 'max-gain-e0'" in capsys.readouterr().err


def test_salf_names_the_default_policy_and_the_default_selectors_measure_it():
    from salf.cli import build_parser
    from salf.sweep import SweepConfig

    cfg = SweepConfig(model="m", dataset="d", out="o", selectors=["salf", DEFAULT_POLICY, "paper"])
    assert cfg.selectors == [DEFAULT_POLICY, "paper"] and cfg.default_selector == DEFAULT_POLICY
    # a folder resolves `salf` with the default it recorded, not with today's
    assert SweepConfig(model="m", dataset="d", out="o", selectors=["salf"],
                       default_selector="max-gain").selectors == ["max-gain"]
    args = build_parser().parse_args(["sweep", "--model", "m", "--dataset", "d", "--out", "o"])
    assert DEFAULT_POLICY in SweepConfig(model="m", dataset="d", out="o",
                                         selectors=args.selectors.split(",")).selectors


def test_a_folder_from_before_the_policy_names_is_renamed_on_open(tmp_path):
    """In a folder without config.json's version, `salf` was max-gain and `salf-e0`
    max-gain-e0: opening it renames them everywhere, and changes no number."""
    from salf.sweep import FOLDER_VERSION, SweepConfig, refresh_report, summarize

    out = tmp_path / "old"
    (out / "cells").mkdir(parents=True)
    cfg = SweepConfig(model="m", dataset="d", out=str(out), cuts=[5], selectors=["paper"])
    cells = [dict(_cell(None, 2.0, selector="full", loss_se=0.05), key="full-s1"),
             dict(_cell(2, 2.01, selector="salf-e0"), key="cut02-s1"),
             dict(_cell(5, 2.3), key="cut05-s1")]
    for c in cells:
        (out / "cells" / f"{c['key']}.json").write_text(json.dumps(dict(c, test_rows=100)))
    picks = {"salf": {"cut": 5, "reason": "r"}, "salf-e0": {"cut": 2, "reason": "r"},
             "paper": {"cut": 5, "reason": "r"}}
    old = summarize(cfg, [dict(c, test_rows=100) for c in cells], picks, {})
    del old["default_selector"]
    (out / "sweep.json").write_text(json.dumps(old))
    config = dict(vars(cfg), selectors=["salf", "salf-e0", "paper"])
    del config["default_selector"]
    (out / "config.json").write_text(json.dumps({"training": cfg.training_key(), "config": config}))

    new = refresh_report(out)
    assert list(new["pick_details"]) == ["max-gain", "max-gain-e0", "paper"]
    assert new["picks"] == {"max-gain": 5, "max-gain-e0": 2, "paper": 5}
    assert new["default_selector"] == DEFAULT_POLICY
    renamed = {"salf": "max-gain", "salf-e0": "max-gain-e0"}
    assert new["pick_details"] == {renamed.get(k, k): v for k, v in old["pick_details"].items()}
    assert all(new[k] == old[k] for k in ("cuts", "full", "oracle"))   # the same computation
    saved = json.loads((out / "config.json").read_text())
    assert saved["version"] == FOLDER_VERSION
    assert saved["config"]["selectors"] == ["max-gain", "max-gain-e0", "paper"]
    assert json.loads((out / "cells" / "cut02-s1.json").read_text())["selector"] == "max-gain-e0"
    assert "**max-gain-e0**" in (out / "sweep.md").read_text()
    # opened again, the folder is current: nothing is renamed twice
    assert refresh_report(out)["pick_details"].keys() == new["pick_details"].keys()


def test_dynamic_cells_beside_the_static_frontier(tmp_path, bench_module):
    """A dyn-<policy> selector trains a cell whose cut moves from the default's pick; its
    schedule, integrated cost and verdict land in sweep.json and the frontier plot."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col", "text",
            "--label-col", "label", "--cuts", "0", "--selectors", "salf,dyn-linear:start=0:checks=2",
            "--seeds", "1", "--budget-steps", "4", "--batch-size", "4", "--test-samples", "8",
            "--samples", "8", "--out", str(out)]
    assert main(argv) == 0
    s = json.loads((out / "sweep.json").read_text())
    name = "dyn-linear:start=0:checks=2"
    cell = next(c for c in s["cells"] if c["selector"] == name)
    assert cell["key"] == "dyn-linear-start=0-checks=2-s1"
    start = s["pick_details"][name]["cut"]
    assert cell["dynamic"]["schedule"][0] == [0, start] and cell["dynamic"]["settings"]["start"] == 0
    # linear from 0% of 4 steps, one check at step 2: half-way to the deepest cut, 3
    step = (3 - start) // 2
    assert cell["dynamic"]["schedule"] == [[0, start]] + ([[2, start + step]] if step else [])
    static_start = next(c["cost"] for c in s["cells"] if c["key"] == f"cut{start:02d}-s1")
    assert cell["cost"] < static_start if step else cell["cost"] >= static_start
    row = s["pick_details"][name]
    assert row["schedules"] == {"1": cell["dynamic"]["schedule"]} and row["safe"] in (True, False)
    assert row["costs"] == {"1": cell["cost"]} and row["cost"] == cell["cost"]
    assert s["picks"][name] is None                                 # not a point of the frontier
    assert (out / "frontier.png").stat().st_size > 10_000
    # a folder without static cuts (--cuts none) still gets its plot: full and the picks
    (tmp_path / "no-cuts").mkdir()
    write_sweep_report(tmp_path / "no-cuts", dict(s, cuts=[]))
    assert (tmp_path / "no-cuts" / "frontier.png").stat().st_size > 10_000
    # bench/sweep_cells.py trains it at another seed with the same start and settings, alone
    assert bench_module("sweep_cells").main([str(out), "dyn-linear-start=0-checks=2-s2"]) == 0
    second = json.loads((out / "cells" / "dyn-linear-start=0-checks=2-s2.json").read_text())
    assert second["selector"] == name and second["cut"] == start and second["seed"] == 2
    assert second["dynamic"]["settings"] == cell["dynamic"]["settings"]
    assert not (out / "cells" / "full-s2.json").exists()
    # a later run asking the same selector with other settings under the same name is refused
    (out / "cells" / f"{cell['key']}.json").write_text(json.dumps(dict(cell, dynamic=dict(
        cell["dynamic"], settings=dict(cell["dynamic"]["settings"], checks=3)))))
    assert main(argv) == 2


def test_a_moving_cuts_cost_is_the_mean_over_its_seeds():
    """A static cut costs the same at every seed; a dynamic cell's schedule differs by seed."""
    from salf.sweep import measure

    cells = [dict(quality=0.87, cost=0.75, loss=0.4, step_s=1.0, seed=1),
             dict(quality=0.88, cost=0.81, loss=0.3, step_s=1.0, seed=2)]
    assert measure(cells)["cost"] == pytest.approx(0.78)


def stop_a_cell(tmp_path, monkeypatch, steps, callback, error):
    """A tiny cut-1 cell (save_steps 2) run whole, then run again and stopped by `callback`
    raising `error`: (its SweepConfig, the whole cell's record, the stopped cell's spec).
    One thread, so that a resume is bit-identical; callers restore the count (one_thread)."""
    import salf.finetune as finetune
    from salf.sweep import SweepConfig, cell_spec, run_cell

    cfg = SweepConfig(model="tiny-llama", dataset=str(_csv(tmp_path)), out=str(tmp_path / "s"),
                      steps=steps, batch_size=4, test_samples=8, save_steps=2,
                      data_kwargs={"text_col": "text", "label_col": "label"})
    item = {"cut": 1, "layers": None, "selector": None, "seed": 1}
    monkeypatch.setenv("SALF_THREADS", "1")
    whole = run_cell(cell_spec(cfg, item, tmp_path / "whole"))
    spec = cell_spec(cfg, item, tmp_path / "stopped")
    run_training = finetune.run_training
    with monkeypatch.context() as m:
        m.setattr(finetune, "run_training",
                  lambda *a, **k: run_training(*a, **k, callbacks=[callback]))
        with pytest.raises(error):
            run_cell(spec)
    return cfg, whole, spec


@contextlib.contextmanager
def one_thread():
    """Put torch's thread count back after a cell ran with SALF_THREADS=1."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_a_cell_stopped_midway_continues_from_its_checkpoint(tmp_path, monkeypatch, sigint_default):
    """--save-steps: a cell stopped early (here Ctrl-C at step 3; a timeout or a kill alike)
    continues from its last checkpoint when the sweep reruns, with the uninterrupted result."""
    import signal

    from transformers import TrainerCallback

    from salf.sweep import run_cell

    class SigintAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    with one_thread():
        _, whole, spec = stop_a_cell(tmp_path, monkeypatch, 5, SigintAt(), KeyboardInterrupt)
        again = run_cell(spec)
    assert whole["resumed_from_step"] is None and again["resumed_from_step"] == 3
    assert len(again["train_loss_curve"]) == 5
    assert again["train_loss_curve"] == pytest.approx(whole["train_loss_curve"], abs=1e-6)
    assert again["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert not (tmp_path / "stopped" / f".work-{spec['key']}").exists()   # cleared once done


def test_ctrl_c_stops_a_sweep_and_the_rerun_continues_the_cell(tmp_path):
    """A terminal's Ctrl-C reaches the sweep and its cell: the cell saves the step it is at,
    the sweep exits 130 saying how to go on, and the same command continues the cell."""
    import signal
    import subprocess
    import sys
    import time

    from salf.train.checkpoints import last_checkpoint, step_of

    out = tmp_path / "s"
    argv = [sys.executable, "-m", "salf", "sweep", "--model", "tiny-llama", "--dataset",
            str(_csv(tmp_path)), "--text-col", "text", "--label-col", "label", "--cuts", "2",
            "--selectors", "freeze-half", "--budget-steps", "100", "--batch-size", "4",
            "--test-samples", "8", "--samples", "8", "--save-steps", "5", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,   # its own group, as a terminal's job is
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = out / "cells" / ".work-full-s1" / "checkpoints"
    deadline = time.time() + 300
    while last_checkpoint(checkpoints) is None:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "rerun the same command to continue, an unfinished cell from its last checkpoint" in err
    stopped = step_of(last_checkpoint(checkpoints))
    assert 0 < stopped < 100 and not (out / "cells" / "full-s1.json").exists()

    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    full = json.loads((out / "cells" / "full-s1.json").read_text())
    assert full["resumed_from_step"] == stopped and len(full["train_loss_curve"]) == 100


def test_a_dynamic_cell_keeps_the_allocation_its_decisions_read():
    """A salf-budget cell reading the updates or the drift keeps each check's per-layer
    allocation (bench/allocation_profile.py reads it from the cell); other cells' checks
    stay as they were."""
    from salf.sweep.runner import dynamic_record

    section = {"settings": {"policy": "salf-budget"}, "schedule": [[0, 2]], "cost": {}, "probe": {},
               "decisions": [{"step": 3, "reason": "hold"}],
               "checks": [{"step": 3, "eof": 2, "loss": None, "deviation": None,
                           "allocation": [0.1, -0.2, 0.0], "allocation_steps": 3},
                          {"step": 6, "eof": 2, "loss": 0.5, "deviation": [0.1], "allocation": None}]}
    checks = dynamic_record(section)["checks"]
    assert checks[0] == {"step": 3, "eof": 2, "loss": None, "deviation": None, "decision": "hold",
                         "allocation": [0.1, -0.2, 0.0], "allocation_steps": 3}
    assert "allocation" not in checks[1] and checks[1]["decision"] is None


def test_cells_copied_in_from_another_folder_are_reported_with_the_pick_they_record():
    """A selector's cells trained in a side folder (the main one was locked) or on another
    machine and copied in: the report reads the pick from the cells instead of leaving them
    out (a --report-only rebuild used to drop a selector its sweep.json had not seen)."""
    from salf.sweep import SweepConfig, summarize

    cfg = SweepConfig(model="m", dataset="d", out="o", test_samples=100)
    settings = {"policy": "salf-budget", "guard": False, "checks": 10}
    dyn = dict(_cell(2, 2.01, selector="dyn-salf-budget:guard=false"), key="dyn-s1", cost=0.8,
               dynamic={"settings": settings, "schedule": [[0, 2], [6, 5]]})
    spectrum = dict(_cell(None, 2.3, selector="spectrum"), key="set-s1", layers=[3, 4], cost=0.6)
    cells = [_cell(None, 2.000, selector="full", loss_se=0.05), _cell(5, 2.030), dyn, spectrum]
    s = summarize(cfg, cells, {"max-gain": {"cut": 5, "reason": "r"}}, {})
    row = s["pick_details"]["dyn-salf-budget:guard=false"]
    assert row["cut"] == 2 and row["dynamic"] == settings and row["cost"] == 0.8
    assert row["schedules"] == {"1": [[0, 2], [6, 5]]} and row["safe"] is True
    assert row["reason"] == "starts at max-gain-e0's eof 2, moves while training"
    assert s["pick_details"]["spectrum"]["layers"] == [3, 4]
    assert s["pick_details"]["spectrum"]["safe"] is False
    assert s["pick_details"]["max-gain"]["reason"] == "r"         # a known pick is kept as it is
    assert list(s["picks"]) == ["max-gain", "dyn-salf-budget:guard=false", "spectrum"]
