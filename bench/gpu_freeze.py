"""GPU step time and peak memory of salf's truncated freezing vs full FT, plain freezing and LoRA.

Random-init Llama shapes (timing does not depend on weight values), bf16, fused AdamW,
full-sequence LM loss, one process, one card. Every variant gets a freshly built model.
Variants per shape:
  full          FreezePlan.full: everything trains
  plain-k       the usual recipe: requires_grad=False on embeddings + layers 1..k (no salf)
  salf-k        salf.train.apply_plan(FreezePlan.manual(k)): truncated backward
  salf-k+gc     the same with gradient checkpointing (trainable layers only)
  lora-all      PEFT LoRA r16 on every layer (salf plan eof=0 + LoRA)
  lora-top      salf plan eof=L/2 + LoRA on the suffix only
Also prints the cost model's predicted step-time ratio for each (salf.cost, machine profile
picked from the card's name) next to the measured one.

usage (on a GPU machine, from the repo root):
  PYTHONPATH=src python bench/gpu_freeze.py [--big] [--tiny-cpu-check]
writes $OUT/gpu_freeze.json (or ./gpu_freeze.json)
"""

import argparse
import gc
import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from salf.cost import ModelShape, StepSettings, cost_curve
from salf.plan import FreezePlan
from salf.train.freeze import LoraSettings, apply_plan

SHAPES = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def build(shape, device, dtype):
    cfg = LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **SHAPES[shape])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the training dtype (no fp32 copy)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    return model


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step_time(model, batch, device, steps, warm):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    times = []
    for i in range(warm + steps):
        sync(device)
        t = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warm:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return statistics.median(times), peak, sum(p.numel() for p in params)


def plain_freeze(model, k):
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers[:k]:
        for p in layer.parameters():
            p.requires_grad_(False)
    return model


def variants(L, tied, cuts):
    head = "frozen" if tied else "trainable"
    out = [("full", lambda m: apply_plan(m, FreezePlan.full(L)), None, "full")]
    mid = L // 2
    out.append((f"plain-{mid}", lambda m: plain_freeze(m, mid), mid, "plain"))
    for k in cuts:
        out.append((f"salf-{k}", lambda m, k=k: apply_plan(m, FreezePlan.manual(k, L, head=head)), k,
                    "salf"))
    out.append((f"salf-{mid}+gc", lambda m: apply_plan(m, FreezePlan.manual(mid, L, head=head),
                                                       gradient_checkpointing=True), mid, "gc"))
    lora = LoraSettings(r=16, alpha=32, dropout=0.0)
    out.append(("lora-all", lambda m: apply_plan(m, FreezePlan.manual(0, L, head="frozen"), lora=lora),
                0, "lora"))
    out.append((f"lora-top{L - mid}", lambda m: apply_plan(m, FreezePlan.manual(mid, L, head="frozen"),
                                                           lora=lora), mid, "lora"))
    return out


def predicted_ratio(shape, kind, k, B, T, machine, dtype_bytes):
    """The cost model's step-time ratio vs full for this variant (None where not modelled)."""
    tied = SHAPES[shape]["tie_word_embeddings"]
    kw = dict(loss_positions="all", dtype_bytes=dtype_bytes, machine=machine, attention="causal")
    if kind == "full":
        return 1.0
    if kind in ("salf", "plain", "gc"):
        step = StepSettings(T, B, head="frozen" if tied else "trainable", gradient_checkpointing=kind == "gc", **kw)
        return cost_curve(SHAPE_CACHE[shape], step, include_full=True)[k]["step_time_ratio"]
    if kind == "lora":
        step = StepSettings(T, B, head="frozen", lora_rank=16, **kw)
        return cost_curve(SHAPE_CACHE[shape], step, include_full=True)[k]["step_time_ratio"]
    return None


SHAPE_CACHE = {}
ALL_ROWS = []


def run_shape(shape, B, T, cuts, device, dtype, steps, warm, machine):
    rows = []
    probe = build(shape, "meta", dtype)
    SHAPE_CACHE[shape] = ModelShape.from_model(probe)
    L = probe.config.num_hidden_layers
    tied = SHAPES[shape]["tie_word_embeddings"]
    del probe
    g = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, SHAPES[shape]["vocab_size"], (B, T), device=device, generator=g)
    for name, setup, k, kind in variants(L, tied, cuts):
        model = setup(build(shape, device, dtype))
        row = dict(shape=shape, variant=name, k=k, L=L, B=B, T=T)
        try:
            t, peak, n = step_time(model, batch, device, steps, warm)
            row.update(step_s=t, peak_gib=peak, trainable=n, tok_s=B * T / t)
        except torch.OutOfMemoryError:
            row.update(oom=True)
        try:
            row["predicted_ratio"] = predicted_ratio(shape, kind, k, B, T, machine,
                                                     2 if dtype == torch.bfloat16 else 4)
        except Exception as e:  # the benchmark must not die on a model gap
            row["predicted_error"] = repr(e)[:200]
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        ALL_ROWS.append(row)
        with open(os.path.join(os.environ.get("OUT", "."), "gpu_freeze.json"), "w") as f:
            json.dump(ALL_ROWS, f, indent=1)  # partial results survive a timeout
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also the 8B shape")
    ap.add_argument("--tiny-cpu-check", action="store_true", help="smoke test on CPU, tiny shape")
    args = ap.parse_args()
    if args.tiny_cpu_check:
        device, dtype, runs, machine = "cpu", torch.float32, [("tiny", 2, 32, [1, 2, 3])], "cpu"
        steps, warm = 2, 1
    else:
        device, dtype = "cuda", torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
        machine = "h200" if "H200" in name else ("h100" if "H100" in name else "gpu")
        print(torch.__version__, name, flush=True)
        runs = [("llama-1b", 8, 1024, [4, 8, 12, 15])]
        if args.big:
            runs.append(("llama-8b", 4, 1024, [16, 24, 28]))
        steps, warm = 6, 2
    rows = []
    for shape, B, T, cuts in runs:
        rows += run_shape(shape, B, T, cuts, device, dtype, steps, warm, machine)
    out = os.path.join(os.environ.get("OUT", "."), "gpu_freeze.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    base = {r["shape"]: r["step_s"] for r in rows if r["variant"] == "full" and r.get("step_s")}
    print(f"{'shape':9} {'variant':12} {'step_s':>8} {'tok/s':>9} {'peak GiB':>8} "
          f"{'vs full':>7} {'predicted':>9}")
    for r in rows:
        s = r.get("step_s")
        ratio = f"{s / base[r['shape']]:.3f}" if s and r["shape"] in base else "-"
        pred = r.get("predicted_ratio")
        print(f"{r['shape']:9} {r['variant']:12} {s and round(s, 4)!s:>8} "
              f"{int(r['tok_s']) if s else 'OOM':>9} {r.get('peak_gib') and round(r['peak_gib'], 1)!s:>8}"
              f" {ratio:>7} {pred and round(pred, 3)!s:>9}")


if __name__ == "__main__":
    main()
