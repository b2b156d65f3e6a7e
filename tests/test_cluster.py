"""Cost of a cut on N ranks (salf.cluster): the engines' formulas, one rank against the
one-device model, the gradient bytes torch's DDP and FSDP2 really move (gloo, 2 CPU
processes), and `salf plan --ranks N --engine E`."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import transformers
from datafiles import reviews_csv

from salf.cli import main
from salf.cluster import (BF16_MIXED, ENGINES, check_cluster, cluster_curve, precision_for,
                          table_cuts)
from salf.cost import ModelShape, StepSettings, cost_curve
from salf.errors import SalfError

SEQ, BATCH = 96, 4


@pytest.fixture(scope="module")
def smollm2():
    return ModelShape.from_config(transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True))


def _curve(shape, ranks, engine, **kw):
    return cluster_curve(shape, SEQ, BATCH, ranks, engine, machine="cpu", **kw)


# --------------------------------------------------------------------------------------
# Formulas

def test_one_fp32_rank_costs_what_the_one_device_model_says(smollm2):
    one_device = cost_curve(smollm2, StepSettings(SEQ, BATCH, machine="cpu"), include_full=True)
    ranked = _curve(smollm2, 1, "ddp")      # one process: no DDP wrapper, no buckets
    assert len(ranked) == len(one_device) == smollm2.num_layers + 2
    for single, rank in zip(one_device, ranked):
        assert rank["comm_bytes"] == 0 and rank["memory"]["buffers"] == 0
        assert rank["precision"] == "fp32"
        assert rank["memory_bytes"] == pytest.approx(single["memory_bytes"], rel=1e-12)
        assert rank["memory_peak_phase"] == single["memory_peak_phase"]


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_shards_what_it_should(smollm2, engine):
    N, k = 8, 15
    entry = _curve(smollm2, N, engine, dtype_bytes=2, precision="bf16-mixed")[k]
    P, T = entry["total_params"], entry["trainable_params"]
    assert P == smollm2.total_params and T == sum(smollm2.layer_params[k:]) + smollm2.final_norm_params
    sharded_params = engine in ("fsdp", "zero3")
    sharded_state = engine != "ddp"
    m = entry["memory"]
    assert m["params"] == pytest.approx(2 * P / (N if sharded_params else 1))
    assert m["grads"] == pytest.approx(2 * T / (N if sharded_state else 1))
    assert m["optimizer"] == pytest.approx((4 + 2 * 4) * T / (N if sharded_state else 1))  # master + m, v
    wire = (N - 1) / N
    layers_below = sum(smollm2.layer_params[k - 1:])     # backward + the prefetched frozen unit
    expected = {"ddp": {"all_reduce": 2 * wire * 2 * T},
                "zero2": {"reduce_scatter": wire * 2 * T, "all_gather": wire * 2 * T},
                "fsdp": {"all_gather": wire * 2 * (P + layers_below), "reduce_scatter": wire * 2 * T}}
    assert entry["comm"] == pytest.approx(expected["fsdp" if engine == "zero3" else engine])
    assert entry["comm_bytes"] == pytest.approx(sum(entry["comm"].values()))


def test_frozen_layers_cost_no_gradient_traffic_but_fsdp_still_gathers_them(smollm2):
    N = 64
    for engine in ENGINES:
        curve = _curve(smollm2, N, engine)
        comm = [e["comm_bytes"] for e in curve[:-1]]
        assert all(a > b for a, b in zip(comm, comm[1:])), engine       # deeper cut, less traffic
        peak = [e["memory_bytes"] for e in curve[:-1]]
        assert all(a >= b for a, b in zip(peak, peak[1:])), engine
    deepest = _curve(smollm2, N, "ddp")[-2]          # eof L: only the final norm trains
    assert deepest["collectives"] == {"all_reduce": smollm2.final_norm_params * 4}
    fsdp = _curve(smollm2, N, "fsdp")[-2]
    assert fsdp["collectives"]["all_gather"] >= smollm2.total_params * 4   # the forward needs them


def test_bf16_mixed_is_sixteen_bytes_per_trainable_and_two_per_frozen_parameter(smollm2):
    for e in (_curve(smollm2, 1, "ddp", dtype_bytes=2, precision="bf16-mixed")[i] for i in (-1, 10)):
        m = e["memory"]
        assert m["params"] + m["grads"] + m["optimizer"] == 2 * e["total_params"] + 14 * e["trainable_params"]
    assert precision_for(2, "bf16-mixed") == BF16_MIXED
    assert precision_for(2) == precision_for(2, "uniform")      # salf.cost's assumption
    assert (precision_for(2).name, precision_for(2).master_bytes, precision_for(4).name) == ("bf16", 0, "fp32")


def test_table_cuts():
    assert table_cuts(32) == [0, 16, 24] and table_cuts(80, [70]) == [0, 40, 60, 70]


@pytest.mark.parametrize("ranks, engine, match", [
    (0, "ddp", "ranks must be a positive integer"), (2.0, "ddp", "ranks"), (True, "ddp", "ranks"),
    (8, "deepspeed", "unknown engine 'deepspeed'")])
def test_bad_ranks_and_engines_are_refused(ranks, engine, match):
    with pytest.raises(SalfError, match=match):
        check_cluster(ranks, engine)


def test_bad_precision_and_lora_are_refused(smollm2):
    with pytest.raises(SalfError, match="unknown precision"):
        _curve(smollm2, 8, "fsdp", precision="fp8")
    with pytest.raises(SalfError, match="LoRA is not modelled"):
        _curve(smollm2, 8, "fsdp", lora_rank=8)


# --------------------------------------------------------------------------------------
# Against torch: the bytes DDP's buckets and FSDP2's collectives carry on 2 gloo ranks

#: (plan fields, the cost model's head) on the tiny Llama (4 layers, tied): a prefix cut, a
#: cut with an untied trainable head copy, and full fine-tuning (the full entry of any head).
PLANS = [(dict(eof=2), "frozen"), (dict(eof=1, head="untied-copy"), "untied-copy"),
         (dict(eof=0, head="trainable", train_embeddings=True), "frozen")]
TOKENS = (2, 16)


def _frozen_tiny_llama(plan_fields):
    from salf.models.tiny import tiny_model
    from salf.plan import FreezePlan
    from salf.train.freeze import apply_plan

    model = tiny_model("llama").train()
    return apply_plan(model, FreezePlan(num_layers=4, **plan_fields))


def _backward(model):
    ids = torch.randint(0, 512, TOKENS, generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


def _ddp_buckets(plan_fields) -> list[dict]:
    """Each gradient bucket DDP all-reduces in one backward: its bytes and parameters."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(_frozen_tiny_llama(plan_fields))
    buckets = []

    def count(state, bucket):
        params = bucket.parameters()
        buckets.append({"bytes": bucket.buffer().numel() * bucket.buffer().element_size(),
                        "params": sum(p.numel() for p in params),
                        "all_trainable": all(p.requires_grad for p in params)})
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, count)
    _backward(ddp)
    return buckets


def _fsdp_collectives(plan_fields) -> dict:
    """Payload bytes of FSDP2's all-gathers (outputs) and reduce-scatters (inputs) in one
    step, one unit per decoder layer plus the root, as fully_shard's docs recommend."""
    from torch.distributed.fsdp import fully_shard

    model = _frozen_tiny_llama(plan_fields)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    payload = {"all_gather": 0, "reduce_scatter": 0}
    all_gather, reduce_scatter = dist.all_gather_single, dist.reduce_scatter_single

    def gather(output_tensor, input_tensor, **kw):
        payload["all_gather"] += output_tensor.numel() * output_tensor.element_size()
        return all_gather(output_tensor, input_tensor, **kw)

    def scatter(output, input, **kw):
        payload["reduce_scatter"] += input.numel() * input.element_size()
        return reduce_scatter(output=output, input=input, **kw)

    dist.all_gather_single, dist.reduce_scatter_single = gather, scatter  # what FSDP2 calls
    try:
        _backward(model)
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = all_gather, reduce_scatter
    return payload


def _measure(rank: int, port: int, out: str, done) -> None:
    """One of 2 gloo ranks: measure every plan of PLANS; rank 0 writes the results. As in
    tests/test_distributed.py, neither rank ends its group or exits before the other is done
    with it (a barrier, then `done`): gloo aborts a rank whose peer tears down first (SIGABRT,
    seen once in a fresh clone's run)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = [{"ddp": _ddp_buckets(fields), "fsdp": _fsdp_collectives(fields)} for fields, _ in PLANS]
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    done.wait(timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_gradient_bytes_match_what_ddp_and_fsdp2_move(tmp_path):
    import torch.multiprocessing as mp

    from salf.models.tiny import tiny_model

    out = tmp_path / "measured.json"
    done = mp.get_context("spawn").Barrier(2)
    mp.spawn(_measure, args=(_free_port(), str(out), done), nprocs=2)
    measured = json.loads(out.read_text())
    shape = ModelShape.from_model(tiny_model("llama"))
    for (fields, head), got in zip(PLANS, measured):
        k = -1 if fields.get("train_embeddings") else fields["eof"]
        ddp, fsdp = (cluster_curve(shape, TOKENS[1], TOKENS[0], 2, engine, head=head, machine="cpu")[k]
                     for engine in ("ddp", "fsdp"))
        # DDP: the buckets hold exactly the trainable gradients; no frozen parameter has one
        assert sum(b["bytes"] for b in got["ddp"]) == ddp["collectives"]["all_reduce"], fields
        assert sum(b["params"] for b in got["ddp"]) == ddp["trainable_params"], fields
        assert all(b["all_trainable"] for b in got["ddp"]), fields
        # FSDP2: forward gathers everything, backward its layers + the prefetched frozen one
        assert got["fsdp"] == fsdp["collectives"], fields


# --------------------------------------------------------------------------------------
# salf plan --ranks N --engine E

def _csv(folder, n=24):
    return reviews_csv(folder, n)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    assert main(["analyze", "--model", "tiny-llama", "--dataset", str(_csv(folder)), "--text-col",
                 "review", "--label-col", "label", "--samples", "8", "--out", str(folder / "a")]) == 0
    return folder / "a" / "trace.json"


def test_plan_prints_per_rank_memory_and_communication(trace_file, tmp_path, capsys):
    capsys.readouterr()
    assert main(["plan", "--trace", str(trace_file), "--policy", "budget=0.6", "--ranks", "64",
                 "--engine", "fsdp", "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert "per rank on 64 x fsdp" in out and "model output" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    header, cuts = rows[0], [r.split(" | ")[0].lstrip("| ") for r in rows[1:]]
    assert "peak GiB" in header and "sent GB/step" in header
    assert cuts == [f"{k} (plan)" if k == plan["eof"] else str(k) for k in table_cuts(4, [plan["eof"]])] + ["full"]
    assert main(["plan", "--trace", str(trace_file), "--out", str(tmp_path / "q.json")]) == 0
    assert "per rank" not in capsys.readouterr().out        # no --ranks, no table


@pytest.mark.parametrize("argv, says", [
    (["--ranks", "0"], "--ranks must be at least 1"),
    (["--ranks", "8", "--engine", "megatron"], "--engine: unknown engine 'megatron'"),
    (["--engine", "fsdp"], "--engine applies with --ranks only")])
def test_plan_cluster_flags_are_checked(trace_file, tmp_path, capsys, argv, says):
    assert main(["plan", "--trace", str(trace_file), "--out", str(tmp_path / "p.json"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("salf: error:") and says in err[0], err
    assert not (tmp_path / "p.json").exists()


def test_docs_table_is_what_bench_cluster_table_prints(bench_module, capsys):
    from pathlib import Path

    bench_module("cluster_table").main([])
    printed = capsys.readouterr().out.strip()
    assert "#### Llama-3-70B" in printed and "| 64 | 60 |" in printed
    doc = (Path(__file__).resolve().parents[1] / "docs" / "multi-gpu.md").read_text()
    assert printed in doc, "docs/multi-gpu.md is stale: paste `python bench/cluster_table.py`"
