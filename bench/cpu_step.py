"""CPU step time and peak memory: full fine-tuning vs salf cuts (and LoRA), side by side.

Real SmolLM2-135M weights, rotten-tomatoes batches, label-position loss (logits_to_keep=1),
AdamW, fp32, batch 16 x 96 tokens by default. Timing: every variant's model and optimizer
live in one process and steps are interleaved (A B C A B C ...), medians reported, so
machine noise hits all variants alike. Memory: each variant runs again in its own
subprocess for a few steps and reports its ru_maxrss (peak RSS). Next to each measured
ratio: the cost model's prediction (salf.cost, machine profile "cpu").

usage: python bench/cpu_step.py [--cuts 15,22,28] [--lora-cut 22] [--steps 6] [--batch 16]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from salf.cost import ModelShape, StepSettings, cost_curve
from salf.data import load_dataset_spec
from salf.models import anatomy, load_model
from salf.data import make_batches, sample_rows
from salf.plan import FreezePlan
from salf.train import LoraSettings, apply_plan
from salf.train.metrics import peak_rss_bytes
from salf.train.prefix_cache import PrefixCache


def setup(variant: str, data=None):
    model, tok, info = load_model("smollm2-135m")
    L = anatomy(model).num_layers
    cache = None
    if variant.startswith("cache-"):  # the cut, with the frozen prefix replayed from a cache
        k = int(variant[6:])
        model = apply_plan(model, FreezePlan.manual(k, L))
        # filled up front: the steps timed here are those from the second epoch on
        cache = PrefixCache(model, k).build(data or batches_for(tok, 4, 16, 96)).attach()
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        return model, tok, opt, cache
    if variant == "full":
        plan, lora = FreezePlan.full(L), None
    elif variant.startswith("lora-"):
        plan, lora = FreezePlan.manual(int(variant[5:]), L), LoraSettings(r=16, alpha=32, dropout=0.0)
    else:
        plan, lora = FreezePlan.manual(int(variant[4:]), L), None
    model = apply_plan(model, plan, lora=lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, tok, opt, cache


def step(model, opt, batch, cache=None, index=None):
    if cache is not None:
        cache.set_batch(index, batch["attention_mask"])
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=pos, logits_to_keep=1, use_cache=False).logits[:, -1]
    F.cross_entropy(logits.float(), batch["target_ids"]).backward()
    if cache is not None:
        cache.set_batch(None, None)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _index(data, i):
    start = sum(len(b["input_ids"]) for b in data[:i])
    return torch.arange(start, start + len(data[i]["input_ids"]))


def batches_for(tok, n, batch, length):
    ds = load_dataset_spec("rotten-tomatoes")
    rows = sample_rows(ds.splits["train"], n * batch, 0, "bench")
    return make_batches(ds.task, tok, rows, batch, length)


def tokenizer():
    from transformers import AutoTokenizer

    from salf.models.registry import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path("smollm2-135m"))


def memory_child(variant, steps, batch, length):
    tok = tokenizer()
    data = batches_for(tok, steps, batch, length)
    model, tok, opt, cache = setup(variant, data)
    for i, b in enumerate(data):
        step(model, opt, b, cache, _index(data, i))
    print(json.dumps({"variant": variant, "peak_rss_mb": peak_rss_bytes() / 2**20}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuts", default="15,22,28")
    ap.add_argument("--lora-cut", type=int, default=22)
    ap.add_argument("--cache-cuts", default="", help="cuts also run with --cache-prefix, e.g. 22,28")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=96)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, 3, args.batch, args.length)
    variants = (["full"] + [f"cut-{k}" for k in args.cuts.split(",")] + [f"lora-{args.lora_cut}"]
                + [f"cache-{k}" for k in args.cache_cuts.split(",") if k])
    mem = {}
    for v in variants:  # before loading anything here: a child's peak must be its own
        out = subprocess.run([sys.executable, __file__, "--memory-child", v, "--batch",
                              str(args.batch), "--length", str(args.length)],
                             capture_output=True, text=True, check=True).stdout
        mem[v] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    tok = tokenizer()
    data = batches_for(tok, args.steps + 1, args.batch, args.length)
    state = {v: setup(v, data) for v in variants}
    times = {v: [] for v in variants}
    for i, b in enumerate(data):
        for v in variants:
            model, _, opt, cache = state[v]
            t = time.perf_counter()
            step(model, opt, b, cache, _index(data, i))
            if i > 0:  # the first round is warm-up
                times[v].append(time.perf_counter() - t)
    del state
    shape = ModelShape.from_model(load_model("smollm2-135m")[0])
    pred = cost_curve(shape, StepSettings(args.length, args.batch, loss_positions="last", machine="cpu"),
                      include_full=True)
    pred_lora = cost_curve(shape, StepSettings(args.length, args.batch, loss_positions="last", lora_rank=16,
                                               machine="cpu"), include_full=True)
    full_t = statistics.median(times["full"])
    rows = []
    for v in variants:
        t = statistics.median(times[v])
        if v == "full":
            p_t = p_m = 1.0
        else:
            k = int(v.split("-")[1])
            src = pred_lora if v.startswith("lora") else pred
            p_t, p_m = src[k]["step_time_ratio"], src[k]["memory_ratio"]
            if v.startswith("cache"):
                p_t = p_m = float("nan")  # the cost model does not model the cache yet
        rows.append(dict(variant=v, median_step_s=t, step_ratio=t / full_t, predicted_step_ratio=p_t,
                         peak_rss_mb=mem[v], rss_ratio=mem[v] / mem["full"],
                         predicted_memory_ratio=p_m))
    print(json.dumps({"batch": args.batch, "length": args.length, "steps": args.steps,
                      "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"{'variant':9} {'step s':>7} {'vs full':>7} {'pred':>6} {'RSS MB':>7} {'vs full':>7} "
          f"{'pred mem':>8}")
    for r in rows:
        print(f"{r['variant']:9} {r['median_step_s']:7.2f} {r['step_ratio']:7.3f} "
              f"{r['predicted_step_ratio']:6.3f} {r['peak_rss_mb']:7.0f} {r['rss_ratio']:7.3f} "
              f"{r['predicted_memory_ratio']:8.3f}")


if __name__ == "__main__":
    main()
