"""Short probe runs at several cuts: can the first S steps tell which cuts are safe?

METHOD §5 (c) proposes calibrating the benefit model with a few very short
probe runs. This measures what such probes would see: for each cut it runs the
first S optimizer steps of exactly the sweep's training (same seed, data order,
batch, length, lr and 120-step linear schedule; stopped after S steps) and
records the training loss of every step. Within the first epoch each batch is
new to the model when its loss is taken, so the curve is a held-out signal.
The question is whether the curves rank the cuts the way the sweep's 120-step
test quality does (bench/results/sweep-smollm2-135m-<dataset>.json).

Resumable per cut; writes bench/results/calibration-probe/<dataset>.json with
the curves, each probe's wall time and its FLOPs as a fraction of one full
fine-tuning run of the sweep (cost model).

    OMP_NUM_THREADS=1 python bench/calibration_probe.py --dataset bbc-news --cuts 29,22,15,2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from salf.config import TrainConfig
from salf.cost import ModelShape, StepSettings, cost_curve
from salf.data import load_dataset_spec
from salf.models import anatomy, load_model
from salf.finetune import RunOptions, run_training
from salf.plan import FreezePlan

OUT = Path(__file__).parent / "results" / "calibration-probe"


class StopAfter(TrainerCallback):
    """End training after n optimizer steps, leaving the run's lr schedule as it is."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.n:
            control.should_training_stop = True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--cuts", required=True, help="comma-separated eof layers, e.g. 29,22,15,2")
    ap.add_argument("--probe-steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    # the sweep's settings (bench/RESULTS.md §4)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=5e-5)
    args = ap.parse_args(argv)

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.dataset}.json"
    settings = {k: getattr(args, k) for k in ("model", "probe_steps", "seed", "steps",
                                              "batch_size", "max_length", "lr")}
    res = json.loads(path.read_text()) if path.exists() else {"settings": settings, "probes": {}}
    if res["settings"] != settings:
        raise SystemExit(f"{path} holds probes with other settings ({res['settings']})")
    ds = load_dataset_spec(args.dataset)
    kind = ds.task.kind
    for k in [int(x) for x in args.cuts.split(",")]:
        if str(k) in res["probes"]:
            continue
        model, tok, info = load_model(args.model)
        anat = anatomy(model)
        plan = FreezePlan.manual(k, anat.num_layers, head="frozen",
                                 model=dict(info.to_dict(), tied=anat.tied))
        step = StepSettings(args.max_length, args.batch_size,
                            loss_positions="last" if kind == "classification" else "all", head="frozen")
        curve = cost_curve(ModelShape.from_model(model), step, include_full=True)
        work = Path(tempfile.mkdtemp(prefix="salf-probe-"))
        t0 = time.perf_counter()
        config = TrainConfig(seed=args.seed, progress=False, max_steps=args.steps,
                             batch_size=args.batch_size, max_length=args.max_length, lr=args.lr)
        m = run_training(args.model, ds, plan, work, config, loaded=(model, tok, info),
                         run=RunOptions(eval_samples=0), callbacks=[StopAfter(args.probe_steps)])
        wall = time.perf_counter() - t0
        shutil.rmtree(work, ignore_errors=True)
        losses = [p["loss"] for p in m["train"]["loss_curve"]]
        res["probes"][str(k)] = {
            "loss_curve": losses, "wall_s": wall,
            "late_mean": statistics.fmean(losses[len(losses) // 2:]),
            # FLOPs of this probe / FLOPs of one full fine-tuning run of `steps` steps
            "flops_vs_full_run": curve[k]["flops_ratio"] * len(losses) / args.steps,
        }
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(f"{args.dataset} eof {k}: mean loss over steps {len(losses) // 2 + 1}-{len(losses)} "
              f"{res['probes'][str(k)]['late_mean']:.3f}, "
              f"{100 * res['probes'][str(k)]['flops_vs_full_run']:.1f}% of a full run", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
