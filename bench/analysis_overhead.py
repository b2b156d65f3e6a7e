"""Analysis cost vs plain forward passes over the same batches (issue: analysis <= 1.2x forward).

Interleaves the variants in one process (A B C A B C ...) and reports medians and ratios:
  forward      model(input_ids, attention_mask) as a user would run it (full logits)
  forward-body the decoder stack only (no unembedding), the part the trace cannot avoid
  trace        salf.analysis.trace (hooks, final norm per space, statistics)
Also times `salf plan` re-planning from a saved trace.

usage: python bench/analysis_overhead.py [--model smollm2-135m] [--dataset rotten-tomatoes]
                                         [--samples 256] [--repeats 3]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from salf.analysis import trace
from salf.config import TraceConfig
from salf.data import load_dataset_spec
from salf.models import anatomy, load_model
from salf.data import make_batches, sample_rows
from salf.pipeline import analyze, replan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, info = load_model(args.model)
    anat = anatomy(model)
    ds = load_dataset_spec(args.dataset)
    rows = sample_rows(ds.splits["train"], args.samples, 0, "bench")
    batches = make_batches(ds.task, tok, rows, args.batch_size, args.max_length)
    label_ids = ds.task.label_token_ids(tok) if ds.task.kind == "classification" else None
    config = TraceConfig(task_kind=ds.task.kind, label_token_ids=label_ids, progress=False)
    base = getattr(model, model.base_model_prefix)

    def pos(b):
        return (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    def forward():
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      position_ids=pos(b), use_cache=False)

    def forward_body():
        with torch.inference_mode():
            for b in batches:
                base(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     position_ids=pos(b), use_cache=False)

    def run_trace():
        trace(model, anat, batches, config)

    variants = {"forward": forward, "forward-body": forward_body, "trace": run_trace}
    times = {k: [] for k in variants}
    run_trace()  # warm-up (basis cache, allocator)
    forward()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    with tempfile.TemporaryDirectory() as tmp:
        analyze(args.model, args.dataset, out_dir=tmp, config=TraceConfig(samples=16, progress=False),
                loaded=(model, tok, info), dataset=ds)
        plan_times = []
        for policy in ("max-gain", "paper", "onset", "knee", "budget=0.5") * 2:
            t = time.perf_counter()
            replan(Path(tmp) / "trace.json", policy, out=Path(tmp) / "p.json")
            plan_times.append(time.perf_counter() - t)
    result = {
        "model": args.model, "dataset": args.dataset, "samples": len(rows),
        "batches": len(batches), "threads": torch.get_num_threads(),
        "median_s": med, "trace_over_forward": med["trace"] / med["forward"],
        "trace_over_forward_body": med["trace"] / med["forward-body"],
        "replan_median_s": statistics.median(plan_times),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
