"""A small sweep rerun against its stored result (issue #23: "a cell rerun gives the
published numbers"): full fine-tuning, a static cut and a moving cut on tiny-llama, four
steps each. The published cells take 20-70 CPU minutes each, so this is the fast stand-in
that catches a refactor changing what a cell trains (row order, learning-rate schedule,
what is frozen, when the cut moves, the cost model). Across CPUs the kernels differ, so
losses compare within 2e-4 (at lr 2e-3 one step moves them by ~0.1, a cell's other cut by
more than 1e-3); the cost and the schedules are plain arithmetic and compare exactly.

Regenerate tests/data/stored_cells.json only for an intended change of behaviour:
SALF_STORE_CELLS=1 python -m pytest tests/test_stored_cell.py
"""

import json
import os
from pathlib import Path

import pytest

from salf.cli import main

STORED = Path(__file__).parent / "data" / "stored_cells.json"
LOSS_TOLERANCE = 2e-4   # kernels of other CPUs move a loss ~1e-6; one step of training ~1e-1
KEPT = ("key", "cut", "selector", "seed", "cost", "train_loss_curve", "loss", "test_rows",
        "trainable_params")


def _csv(tmp_path, n=64):
    path = tmp_path / "d.csv"
    rows = ["text,label"] + [f"{'lovely bright' if i % 3 else 'awful grim'} film number {i},"
                             f"{'positive' if i % 3 else 'negative'}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _cells(tmp_path) -> dict:
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), "--text-col", "text",
            "--label-col", "label", "--cuts", "2", "--selectors", "dyn-linear:start=0.25",
            "--seeds", "1", "--budget-steps", "4", "--lr", "2e-3", "--batch-size", "4", "--test-samples", "8",
            "--samples", "8", "--out", str(out)]
    assert main(argv) == 0
    cells = {}
    for path in sorted((out / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        kept = {k: cell[k] for k in KEPT}
        if cell.get("dynamic"):
            kept["schedule"] = cell["dynamic"]["schedule"]
        cells[cell["key"]] = kept
    return cells


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and path.split(".")[-1].split("[")[0] in ("train_loss_curve", "loss"):
        assert a == pytest.approx(b, abs=LOSS_TOLERANCE), path
    else:
        assert a == b, path


def test_a_small_sweep_reruns_to_its_stored_numbers(tmp_path):
    cells = _cells(tmp_path)
    if os.environ.get("SALF_STORE_CELLS"):
        STORED.parent.mkdir(exist_ok=True)
        STORED.write_text(json.dumps(cells, indent=1) + "\n")
    stored = json.loads(STORED.read_text())
    assert set(cells) == {"full-s1", "cut02-s1", "dyn-linear-start=0.25-s1"}
    _close(cells, stored)
    losses = [c["train_loss_curve"] for c in cells.values()]
    assert all(len(curve) == 4 for curve in losses) and losses[0] != losses[1]
