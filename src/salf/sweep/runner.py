"""Running cells: one in this process (`run_cell`, what `python -m salf.sweep SPEC` does),
one in a subprocess of its own (`run_cell_subprocess`), and `jobs` of them at a time, spread
over the CPU threads and GPUs (`run_cells`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..distributed import without_launcher
from ..errors import SalfError
from ..io import atomic_write_json, read_json
from .cells import cell_cost


def run_cell(spec: dict) -> dict:
    """Train + evaluate one cell in this process; returns the result record."""
    import torch

    from ..data import first_rows, load_dataset_spec
    from ..models import load_model
    from ..train import evaluate

    torch.set_num_threads(int(os.environ.get("SALF_THREADS", torch.get_num_threads())))
    model, tok, info = load_model(spec["model"])
    plan = cell_plan(spec, model, info)
    ds = load_dataset_spec(spec["dataset"], **spec.get("data_kwargs", {}))
    metrics, train_s = train_cell(spec, ds, plan, (model, tok, info))
    rows = first_rows(ds, "test", spec["test_samples"])
    quality = evaluate(model, tok, ds.task, rows, batch_size=32, max_length=spec["max_length"])
    shutil.rmtree(Path(spec["work_dir"]), ignore_errors=True)  # cells keep numbers, not 0.5 GB model copies
    return cell_record(spec, metrics, quality, measured_cost(spec, plan, metrics, model, ds.task.kind),
                       train_s, ds.task.kind)


def cell_plan(spec: dict, model, info):
    """The FreezePlan of a cell: full fine-tuning, a layer set or a cut."""
    from ..models import anatomy
    from ..plan import FreezePlan

    anat = anatomy(model)
    L = anat.num_layers
    model_dict = dict(info.to_dict(), tied=anat.tied)
    if spec["cut"] is None and spec.get("layers") is None:
        return FreezePlan.full(L, model=model_dict)
    if spec.get("layers") is not None:
        layers = sorted(spec["layers"])
        return FreezePlan.manual(layers[0], L, head=spec["head"], model=model_dict,
                                 policy="set", layers=layers)
    return FreezePlan.manual(spec["cut"], L, head=spec["head"], model=model_dict)


def train_cell(spec: dict, ds, plan, loaded) -> tuple[dict, float]:
    """(metrics, seconds) of training a cell in its work folder. An unfinished cell that saved
    checkpoints continues from its last one (bit-identical to an uninterrupted run on one
    thread); otherwise a leftover folder is cleared."""
    from ..config import TrainConfig
    from ..finetune import RunOptions, run_training

    dynamic = None
    if spec.get("dynamic") is not None:
        from ..dynamic import DynamicSettings

        dynamic = DynamicSettings.from_dict(spec["dynamic"])
    work = Path(spec["work_dir"])
    save_steps = spec.get("save_steps")
    resume = bool(save_steps) and (work / "run.json").exists()
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    config = TrainConfig(max_steps=spec["steps"], batch_size=spec["batch_size"],
                         max_length=spec["max_length"], lr=spec["lr"], seed=spec["seed"],
                         save_steps=save_steps, save_total_limit=1, resume=resume, progress=False)
    metrics = run_training(spec["model"], ds, plan, work, config, loaded=loaded,
                           run=RunOptions(eval_samples=0, dynamic=dynamic))
    return metrics, time.perf_counter() - t0


def measured_cost(spec: dict, plan, metrics: dict, model, kind: str) -> float:
    """A cell's training FLOPs relative to full fine-tuning: a moving cut's integrated schedule,
    else the cost model's for its cut or layer set (cell_cost)."""
    from ..cost import ModelShape

    moved = metrics.get("dynamic")
    if plan.is_full:
        return 1.0
    if moved:
        return moved["cost"]["flops_ratio"]
    return cell_cost(ModelShape.from_model(model), plan.eof, plan.layers, spec, kind)


def cell_record(spec: dict, metrics: dict, quality: dict, cost: float, train_s: float, kind: str) -> dict:
    """OUT/cells/<key>.json: what a cell keeps of its run (docs/sweep.md)."""
    moved = metrics.get("dynamic")
    mem = metrics.get("memory", {})
    peak = mem.get("cuda_peak_allocated_bytes") or mem.get("peak_rss_bytes")
    metric = "accuracy" if kind == "classification" else "loss"
    return {
        "key": spec["key"], "cut": spec["cut"], "layers": spec.get("layers"),
        "selector": spec.get("selector"), "seed": spec["seed"],
        "quality": quality[metric], "loss": quality["loss"],
        "accuracy": quality.get("accuracy"), "macro_f1": quality.get("macro_f1"),
        "label_loss": quality.get("label_loss"), "perplexity": quality.get("perplexity"),
        "loss_se": quality.get("loss_se"), "test_rows": quality.get("n"),
        "cost": cost, "cost_basis": "trained-layers",
        "step_s": metrics["timing"].get("median_step_s"),
        "peak_mb": peak / 2**20 if peak else None, "train_s": train_s,
        # a resumed cell's train_s covers the steps after this one only; steps_s_total is
        # the time of every step of the run (the probe reads included), across resumes
        "resumed_from_step": metrics.get("resumed_from_step"),
        "steps_s_total": metrics["timing"].get("steps_s_total"),
        "final_train_loss": metrics["train"].get("final_loss"),
        # per-step training loss: within the first epoch each batch is new to the model when
        # its loss is taken, so the curve is a held-out signal too (what a short probe sees)
        "train_loss_curve": [round(p["loss"], 5) for p in metrics["train"].get("loss_curve", [])],
        "trainable_params": metrics["params"].get("trainable"),
        "audit_ok": metrics["audit"]["ok"] and (not moved or moved["audit"]["ok"]),
        **({"dynamic": dynamic_record(moved)} if moved else {}),
    }


def dynamic_record(section: dict) -> dict:
    """What a dynamic cell keeps of metrics.json["dynamic"]: the settings, the schedule, the
    integrated cost and the probe's share, and every check with its decision — and, for a
    salf-budget run reading the updates or the drift, the per-layer allocation it decided on
    (what bench/allocation_profile.py reads)."""
    decisions = {d["step"]: d for d in section["decisions"]}
    checks = [{"step": c["step"], "eof": c["eof"], "loss": c["loss"],
               "deviation": c["deviation"], "decision": decisions.get(c["step"], {}).get("reason"),
               **({"allocation": c["allocation"], "allocation_steps": c.get("allocation_steps")}
                  if c.get("allocation") is not None else {})}
              for c in section["checks"]]
    return {"settings": section["settings"], "schedule": section["schedule"],
            "cost": section["cost"], "probe": section["probe"], "checks": checks}


def cell_process_env(env_extra: dict | None = None) -> dict:
    """A cell subprocess's environment: this process's without a launcher's variables (a cell
    is one process: it would wait for ranks that never come, or train under the launcher's
    engine unlike the sweep's other cells), the sweep's PID for die_with_parent, `env_extra`."""
    return dict(without_launcher(os.environ), PYTHONUNBUFFERED="1",
                SALF_SWEEP_PID=str(os.getpid()), **(env_extra or {}))


def run_cell_subprocess(spec: dict, cells_dir: Path, timeout_s: int | None,
                        env_extra: dict | None = None) -> dict:
    # the spec goes in the cell's work folder, which the cell's next run clears or resumes
    # from: one left by a killed sweep lies nowhere the folder's cells are read from
    spec_path = Path(spec["work_dir"]) / "spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "salf.sweep", str(spec_path)],
                          capture_output=True, text=True, timeout=timeout_s,
                          env=cell_process_env(env_extra))
    spec_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SalfError(f"sweep cell {spec['key']} failed: {tail}")
    result_path = cells_dir / f"{spec['key']}.json"
    return read_json(result_path, "sweep cell")


def cell_environments(jobs: int) -> list[dict]:
    """Environment overrides for `jobs` cells running at once: the CPU threads split between
    them (unless SALF_THREADS is set), and with several GPUs, cells spread over them."""
    if jobs <= 1:
        return [{}]
    envs = [{} for _ in range(jobs)]
    if "SALF_THREADS" not in os.environ:
        for e in envs:
            e["SALF_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if not gpus:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if len(gpus) > 1:
        for i, e in enumerate(envs):
            e["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
    return envs


def run_cells(specs: list[dict], cells_dir: Path, timeout_s: int | None, jobs: int, finished,
              on_start=lambda key: None) -> None:
    """Run cell subprocesses, `jobs` at a time, in the order given; `finished(result)` is
    called in this thread as each one ends. If a cell fails, no new cell starts, the ones
    running finish (and are kept), then the first failure is raised."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    envs = cell_environments(jobs)
    free = list(range(len(envs)))  # slots: each running cell holds one environment
    pending = list(specs)
    failure: Exception | None = None
    with ThreadPoolExecutor(max_workers=len(envs)) as pool:
        running = {}
        while pending or running:
            while pending and free and failure is None:
                spec, slot = pending.pop(0), free.pop(0)
                on_start(spec["key"])
                running[pool.submit(run_cell_subprocess, spec, cells_dir, timeout_s,
                                    envs[slot])] = slot
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                free.append(running.pop(fut))
                try:
                    finished(fut.result())
                except (SalfError, subprocess.TimeoutExpired) as e:
                    failure = failure or e
    if failure is not None:
        raise failure if isinstance(failure, SalfError) else SalfError(
            f"a sweep cell ran past --cell-timeout {timeout_s} s ({failure}); a rerun starts it "
            "again, or with --save-steps continues it from its last checkpoint")


def die_with_parent() -> None:
    """Have the kernel SIGKILL this cell when the sweep that started it dies, however it dies
    (a SIGKILL'ed sweep forwards nothing): an orphaned cell would train on, holding the device
    and its work folder while a rerun trains the same cell. Linux's PR_SET_PDEATHSIG, set here
    after exec: a preexec_fn is unsafe in a process with threads (run_cells has), and a
    polling thread needs the GIL, which a long native call holds. The signal comes when the
    thread that started the cell ends; run_cells' thread waits for the cell, so that is the
    sweep's death. A cell run by hand (no SALF_SWEEP_PID) is left alone."""
    parent = os.environ.get("SALF_SWEEP_PID")
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):  # the sweep died before the prctl: no signal will come
        raise SystemExit(1)


def cell_main(spec_path: str) -> int:
    """Run the cell a spec file describes; its result goes beside its work folder (a sweep's
    OUT/cells/<key>.json)."""
    spec = read_json(spec_path, "sweep cell spec")
    result = run_cell(spec)
    atomic_write_json(Path(spec["work_dir"]).parent / f"{spec['key']}.json", result)
    return 0
