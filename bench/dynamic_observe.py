"""Watch a static run with the dynamic controller's eyes: train one sweep cell at a fixed cut
with the probe read at every check (policy "static": the cut never moves), and keep the
checks — the deviation per space and the probe loss over training. These trajectories are
what the thresholds of the `salf` dynamic policy (tau, epsilon) are read against; the cell's
quality must equal the static sweep cell's at the same cut and seed (the probe only reads).

    python bench/dynamic_observe.py rotten-tomatoes --eof 4 --seed 1 \
        --out bench/results/dynamic-observe/rotten-tomatoes-cut04-s1.json

Settings are the published sweep's (bench/RESULTS.md §4): SmolLM2-135M, 120 steps, batch 16,
<= 96 tokens, lr 5e-5, head frozen, the first 1000 test rows.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from salf.config import TrainConfig
from salf.cost import ModelShape
from salf.data import load_dataset_spec
from salf.dynamic import DynamicFreezeCallback, DynamicSettings, Probe, probe_rows
from salf.io import atomic_write_json
from salf.models import anatomy, load_model
from salf.data import make_batches
from salf.plan import FreezePlan
from salf.train import evaluate, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--eof", type=int, required=True, help="the fixed cut")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--checks", type=int, default=10)
    ap.add_argument("--probe-rows", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    model, tok, info = load_model("smollm2-135m")
    anat = anatomy(model)
    ds = load_dataset_spec(args.dataset)
    kind = ds.task.kind
    probe_set, splits = probe_rows(ds.splits, args.probe_rows, seed=0)
    label_ids = ds.task.label_token_ids(tok) if kind == "classification" else None
    probe = Probe(make_batches(ds.task, tok, probe_set, 8, 96), kind, label_ids)
    settings = DynamicSettings(policy="static", checks=args.checks, probe_rows=args.probe_rows)
    callback = DynamicFreezeCallback(settings, probe)
    plan = FreezePlan.manual(args.eof, anat.num_layers, model=dict(info.to_dict(), tied=anat.tied))
    work = Path(tempfile.mkdtemp(prefix="salf-observe-"))
    t0 = time.perf_counter()
    config = TrainConfig(seed=args.seed, progress=False, max_steps=args.steps, batch_size=16,
                         max_length=96, lr=5e-5, base_spec="smollm2-135m")
    metrics = train(model, tok, ds.task, splits["train"], plan, work, config, callbacks=[callback])
    train_s = time.perf_counter() - t0
    quality = evaluate(model, tok, ds.task, ds.splits["test"][:1000], batch_size=32, max_length=96)
    shutil.rmtree(work, ignore_errors=True)
    positions = "last" if kind == "classification" else "all"
    callback.attach(model, None, {"shape": ModelShape.from_model(model), "seq_len": 96,
                                  "batch_size": 16, "loss_positions": positions, "head": "frozen"})
    cost = callback.integrated_cost()
    metric = "accuracy" if kind == "classification" else "loss"
    atomic_write_json(args.out, {
        "dataset": args.dataset, "eof": args.eof, "seed": args.seed, "steps": args.steps,
        "quality": quality[metric], "test": quality, "cost": cost, "train_s": train_s,
        "train_loss_curve": [round(p["loss"], 5) for p in metrics["train"]["loss_curve"]],
        "dynamic": callback.report(),
    })
    print(f"{args.dataset} eof {args.eof} seed {args.seed}: {metric} {quality[metric]:.4f}, "
          f"probe share {cost['probe_share_of_run']:.3%}, {train_s:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
