"""GPU: salf's prefix-activation cache vs plain truncated freezing vs full fine-tuning.

Same setting as bench/gpu_freeze.py (random-init Llama-8B shape, bf16, fused AdamW, batch
4 x 1024, full-sequence LM loss). For each cut k: `salf-k` = apply_plan only; `cache-k` =
apply_plan + a PrefixCache filled for the batch, so the timed steps are those of a second
epoch (the frozen prefix is replayed, not run). Reference in ../shared DATA.md: skipping
the prefix gave 0.53 / 0.30 / 0.19 of full at k = 16 / 24 / 28 on an H200.

usage: PYTHONPATH=src python bench/gpu_prefix_cache.py [--shape llama-8b]
writes $OUT/gpu_prefix_cache.json
"""

import argparse
import gc
import json
import os
import statistics
import time

import torch

from salf.plan import FreezePlan
from salf.train.freeze import apply_plan
from salf.train.prefix_cache import PrefixCache

from gpu_freeze import SHAPES, build  # noqa: E402  (same folder)


def timed(model, batch, cache, steps=6, warm=2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    model.train()
    mask = torch.ones_like(batch)
    index = torch.arange(batch.shape[0])
    times = []
    for i in range(warm + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        if cache is not None:
            cache.set_batch(index, mask)
        model(input_ids=batch, labels=batch).loss.backward()
        if cache is not None:
            cache.set_batch(None, None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--cuts", default="16,24,28")
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    L = cfg["num_hidden_layers"]
    B, T = (4, 1024) if args.shape == "llama-8b" else (8, 1024)
    batch = torch.randint(0, cfg["vocab_size"], (B, T), device="cuda",
                          generator=torch.Generator(device="cuda").manual_seed(0))
    head = "frozen" if cfg["tie_word_embeddings"] else "trainable"
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    rows = []
    variants = [("full", None, False)] + [(f"{kind}-{k}", int(k), kind == "cache")
                                          for k in args.cuts.split(",") for kind in ("salf", "cache")]
    for name, k, use_cache in variants:
        model = build(args.shape, "cuda", torch.bfloat16)
        model = apply_plan(model, FreezePlan.full(L) if k is None else
                           FreezePlan.manual(k, L, head=head))
        cache = None
        if use_cache:
            cache = PrefixCache(model, k).build([{"input_ids": batch,
                                                  "attention_mask": torch.ones_like(batch)}]).attach()
        t, peak = timed(model, batch, cache)
        rows.append(dict(shape=args.shape, variant=name, k=k, step_s=t, peak_gib=peak))
        print(json.dumps(rows[-1]), flush=True)
        del model, cache
        gc.collect()
        torch.cuda.empty_cache()
        with open(os.path.join(os.environ.get("OUT", "."), "gpu_prefix_cache.json"), "w") as f:
            json.dump(rows, f, indent=1)
    full = rows[0]["step_s"]
    print(f"{'variant':10} {'step_s':>8} {'vs full':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['variant']:10} {r['step_s']:8.4f} {r['step_s'] / full:8.3f} {r['peak_gib']:9.1f}")


if __name__ == "__main__":
    main()
