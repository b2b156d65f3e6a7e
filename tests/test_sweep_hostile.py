"""`salf sweep` against hostile input (issue #22): a launcher, two sweeps in one folder, a
killed sweep, empty or out-of-range lists. Each is refused with one line, before any model
loads, or leaves nothing behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_errors import _fails, _parsers
from test_sweep import _csv

from salf.cli import build_parser, main
from salf.errors import SalfError

COLS = ["--text-col", "text", "--label-col", "label"]


@pytest.fixture
def broken_model(tmp_path):
    """A model folder that cannot load: an error naming a flag was raised before any load."""
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    return folder


def test_a_sweep_under_a_launcher_is_refused(tmp_path, monkeypatch, broken_model):
    """Under torchrun every rank would run the whole sweep, and each cell wait for its ranks."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)   # what torchrun tells its processes
    _fails("sweep", "--model", broken_model, "--dataset", _csv(tmp_path), *COLS,
           "--out", tmp_path / "s", says="run `salf sweep --jobs N` without torchrun")


def test_a_cell_runs_without_the_launchers_variables(tmp_path, monkeypatch):
    import salf.sweep.runner as sweep

    launcher = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "0", "ROLE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
                "ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "bf16",
                "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}
    for name, value in {**launcher, "SALF_THREADS": "3"}.items():
        monkeypatch.setenv(name, value)
    ran = {}

    def fake_run(argv, **kwargs):
        ran.update(argv=argv, env=kwargs["env"])
        return subprocess.CompletedProcess(argv, 1, "", "boom")

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    spec = {"key": "full-s1", "work_dir": str(tmp_path / "cells" / ".work-full-s1")}
    with pytest.raises(SalfError, match="sweep cell full-s1 failed: boom"):
        sweep.run_cell_subprocess(spec, tmp_path / "cells", None, {"CUDA_VISIBLE_DEVICES": "1"})
    env = ran["env"]
    assert not set(launcher) & set(env)
    assert env["SALF_THREADS"] == "3" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["SALF_SWEEP_PID"] == str(os.getpid())      # for the cell's die_with_parent
    # the spec was written in the cell's work folder, not among the cells
    assert Path(ran["argv"][-1]) == tmp_path / "cells" / ".work-full-s1" / "spec.json"


@pytest.mark.parametrize("flag, value, says", [
    ("--seeds", "1,-1", "--seeds must be integers from 0 to 4294967295"),
    ("--seeds", str(2**32), "--seeds must be integers from 0 to 4294967295"),
    ("--selectors", "", "--selectors names no selector; give 'none'"),
    ("--selectors", " , ", "--selectors names no selector"),
    ("--selectors", "salf,budget=abc", "sweep selector 'budget=abc': invalid budget policy"),
    ("--selectors", "budget=0", "sweep selector 'budget=0'"),
    ("--selectors", "dyn-salf:tau=abc", "sweep selector 'dyn-salf:tau=abc'"),
    ("--selectors", "dyn-nope", "unknown dynamic policy 'nope'"),
])
def test_seeds_and_selectors_are_checked_before_any_model_loads(tmp_path, broken_model, flag,
                                                                value, says):
    _fails("sweep", "--model", broken_model, "--dataset", _csv(tmp_path), *COLS, flag, value,
           "--out", tmp_path / "s", says=says)


def test_the_seed_range_ends_where_set_seed_s_does():
    import numpy as np

    from salf.config import MAX_SEED
    from salf.sweep import check_sweep_arguments

    args = build_parser().parse_args(["sweep", "--model", "m", "--dataset", "d", "--out", "o",
                                      "--seeds", f"0,{MAX_SEED}", "--selectors", "none"])
    check_sweep_arguments(args)
    # transformers.set_seed's bound is numpy's (np.random.seed), checked without seeding
    np.random.RandomState(MAX_SEED)
    with pytest.raises(ValueError):
        np.random.RandomState(MAX_SEED + 1)


def test_selectors_none_trains_full_fine_tuning_and_the_cuts_only(tmp_path, capsys):
    base = ["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), *COLS,
            "--selectors", "none", "--budget-steps", "2", "--batch-size", "4",
            "--test-samples", "8", "--samples", "8", "--dry-run", "--out", str(tmp_path / "s")]
    assert main(base + ["--cuts", "none"]) == 0
    said = capsys.readouterr().out
    assert "0 of the 1 cells asked for are done; 1 to train: full-s1" in said
    assert "pick" not in said
    assert main(base + ["--cuts", "1"]) == 0
    assert "0 of the 2 cells asked for are done; 2 to train: full-s1, cut01-s1" in \
        capsys.readouterr().out
    sweep = dict(_parsers(build_parser()))["salf sweep"]
    assert "or 'none' (full fine-tuning and the --cuts cells only" in next(
        a.help for a in sweep._actions if a.dest == "selectors")


def test_the_folder_lock_names_its_holder_and_goes_with_it(tmp_path, bench_module):
    from salf.sweep import LOCK_FILE, folder_lock

    (tmp_path / "config.json").write_text("{}")
    with folder_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(SalfError, match=rf"in use by another sweep \(PID {os.getpid()}\)"):
            with folder_lock(tmp_path):
                pass
        # bench/sweep_cells.py trains into a sweep's folder: it takes the same lock
        with pytest.raises(SalfError, match=rf"\(PID {os.getpid()}\)"):
            bench_module("sweep_cells").main([str(tmp_path), "full-s1"])
    with folder_lock(tmp_path):   # released
        pass


def _live_cells(out: Path) -> list[int]:
    """PIDs of the running cell processes (`python -m salf.sweep SPEC`) of the sweep in `out`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue   # gone meanwhile, or not a process
        if argv[1:3] == ["-m", "salf.sweep"] and str(out) in argv[3] and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_one_sweep_per_folder_and_its_cell_dies_with_it(tmp_path):
    """A second sweep into a running sweep's folder is refused, naming the first; the first
    killed (SIGKILL), its cell dies too, and the rerun finds the folder free and clean."""
    from salf.train.checkpoints import last_checkpoint

    out = tmp_path / "s"
    args = ["sweep", "--model", "tiny-llama", "--dataset", str(_csv(tmp_path)), *COLS,
            "--cuts", "none", "--selectors", "freeze-half", "--budget-steps", "100000",
            "--batch-size", "4", "--test-samples", "8", "--samples", "8", "--save-steps", "5",
            "--out", str(out)]
    with open(tmp_path / "err", "w") as err:
        first = subprocess.Popen([sys.executable, "-m", "salf", *args], stdout=subprocess.DEVNULL,
                                 stderr=err, start_new_session=True)
    try:
        checkpoints = out / "cells" / ".work-full-s1" / "checkpoints"
        deadline = time.time() + 300
        while last_checkpoint(checkpoints) is None:   # its cell is training
            assert first.poll() is None, (tmp_path / "err").read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        assert len(_live_cells(out)) == 1
        _fails(*args, "--dry-run", says=f"in use by another sweep (PID {first.pid})")

        first.kill()
        first.wait()
        deadline = time.time() + 30
        while _live_cells(out) and time.time() < deadline:
            time.sleep(0.1)
        assert not _live_cells(out)
        again = subprocess.run([sys.executable, "-m", "salf", *args, "--dry-run"],
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "2 to train: full-s1, cut02-s1" in again.stdout
        assert not list((out / "cells").glob(".*.spec.json"))
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)   # the cell too, if it outlived the sweep
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_cell_whose_sweep_died_before_it_started_exits(tmp_path):
    """The sweep may die between starting a cell and the cell's prctl: no signal would come."""
    r = subprocess.run([sys.executable, "-m", "salf.sweep", str(tmp_path / "spec.json")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, SALF_SWEEP_PID=str(os.getpid() + 1)))
    assert (r.returncode, r.stderr) == (1, "")
