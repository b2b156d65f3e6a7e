"""salf on several processes: CPU, gloo, 2 processes, the 4-layer tiny Llama.

* `torchrun -m salf train` with DDP writes one set of outputs, and its loss curve is the one
  a single process gets with the same global batch;
* DDP inside `train`: no frozen parameter gets a gradient (on any rank), a gradient bucket or
  optimizer state; a run stopped at a checkpoint and resumed with 2 processes ends
  bit-identical to an uninterrupted one;
* `analyze` sharded over 2 processes returns the one-process trace, bit for bit;
* FSDP2 laid out as accelerate's plugin lays it out (one unit per decoder layer) trains a
  plan: the one-process loss curve, frozen weights bit-identical, no gradient below the cut;
* a moving cut (--dynamic) under DDP: the one-process schedule and loss curve, no gradient
  for a layer frozen mid-run, a resume after the move bit-identical;
* an undone move (salf-budget's guard) under DDP: the layer trains again on both ranks,
  whose weights agree, and a resume after the undo is bit-identical;
* the refusals: --dynamic under FSDP or DeepSpeed, FSDP where accelerate would fall back to DDP.

Losses of different process counts are compared within LOSS_TOL (the same examples per
step, summed in another order); what runs twice with the same processes must be equal.
See docs/multi-gpu.md.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from salf.config import TrainConfig
from salf.errors import SalfError

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

LOSS_TOL = 1e-5     # absolute, on losses of ~6.4 (fp32)
TRAIN = ["--model", "tiny-llama", "--dataset", "rotten-tomatoes", "--freeze-below", "2",
         "--max-steps", "3", "--train-samples", "64", "--eval-samples", "8", "--save-steps", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    """Be rank `rank` of 2, as torchrun would say it (salf.distributed reads the same variables)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)


def _two_ranks(rank: int, port: int, out: str, done) -> None:
    """One of the 2 processes every in-process test reads (one start for all: each costs
    seconds of imports): DDP training, the sharded analysis, FSDP2; rank<r>-<part>.json.
    Neither exits before both have ended their process group (`done`, a 2-party barrier): a
    rank that exits first can make gloo abort the other mid-teardown (SIGABRT, seen in CI)."""
    from salf import distributed

    _join(rank, port)
    for part, run in (("ddp", _ddp_part), ("dynamic", _dynamic_part), ("undo", _undo_part),
                      ("analysis", _analysis_part), ("fsdp", _fsdp_part)):
        folder = Path(out, part)
        folder.mkdir(exist_ok=True)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(run(rank, folder)))
    distributed.finish()
    done.wait(timeout=120)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks")
    done = mp.get_context("spawn").Barrier(2)
    mp.spawn(_two_ranks, args=(_free_port(), str(out), done), nprocs=2)
    return out


def _rank_results(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- torchrun + CLI


def test_torchrun_trains_with_ddp_like_one_process_with_the_global_batch(tmp_path):
    from salf.cli import main
    from salf.train.checkpoints import checkpoint_problem

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "salf", "train", *TRAIN, "--batch-size", "4", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("audit:") == 1            # rank 1 prints nothing
    assert main(["train", *TRAIN, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    names = _files(ddp)
    assert not [n for n in names if "tmp" in n]        # every staging folder published
    rng = {n.replace("rng_state_0.pth", "rng_state.pth") for n in names if "rng_state_1" not in n}
    assert rng == _files(one)                          # one set of outputs, the one-process set
    log = [json.loads(line) for line in (ddp / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]       # written once, not once per rank

    m_ddp, m_one = (json.loads((d / "metrics.json").read_text()) for d in (ddp, one))
    assert (m_ddp["settings"]["processes"], m_ddp["settings"]["engine"]) == (2, "ddp")
    assert m_ddp["train"]["epoch"] == m_one["train"]["epoch"]     # 2 x 4 rows a step = 8
    for a, b in zip(m_ddp["train"]["loss_curve"], m_one["train"]["loss_curve"], strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) <= LOSS_TOL
    assert m_ddp["audit"]["ok"] and m_ddp["audit"]["frozen_unchanged"] == m_ddp["audit"]["frozen_count"]

    w_ddp, w_one = (_tensors(d / "final" / "model.safetensors") for d in (ddp, one))
    frozen = [n for n in w_one if n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))]
    assert frozen and all(torch.equal(w_ddp[n], w_one[n]) for n in frozen)
    assert all(torch.allclose(w_ddp[n], w_one[n], atol=1e-6) for n in w_one)
    for ckpt in (ddp / "checkpoints").iterdir():
        assert checkpoint_problem(ckpt, processes=2) is None


# ----------------------------------------------------------------------------- DDP in train()


def _ddp_run(folder, callbacks=(), resume=False, steps=4, lora=None, eof=2, batch_size=2, **kwargs) -> dict:
    from salf.data import load_dataset_spec
    from salf.models import load_model
    from salf.plan import FreezePlan
    from salf.train import train

    ds = load_dataset_spec("rotten-tomatoes", seed=0)
    model, tok, _ = load_model("tiny-llama")
    return train(model, tok, ds.task, (ds.splits["train"][:32], ds.splits["validation"][:8]), FreezePlan.manual(eof, 4),
                 folder,
                 TrainConfig(max_steps=steps, batch_size=batch_size, save_steps=2, resume=resume, progress=False,
                             lora=lora, **kwargs),
                 callbacks=list(callbacks))


def _ddp_part(rank: int, out: Path) -> dict:
    """An uninterrupted run (recording gradients, buckets, optimizer state), then a run
    stopped at its step-2 checkpoint and resumed, then one step with LoRA above the cut (no
    adapter tensor is exempt from weight decay: the Trainer's no-decay group is empty)."""
    from torch.nn.parallel import DistributedDataParallel
    from transformers import TrainerCallback

    from salf.train import LoraSettings

    record: dict = {"buckets": [], "find_unused": []}
    build = DistributedDataParallel._build_params_for_reducer

    def bucketed(ddp):
        params, sparse = build(ddp)
        names = {id(p): n for n, p in ddp.module.named_parameters()}
        record["buckets"].append(sorted(names[id(p)] for p in params))
        record["find_unused"].append(ddp.find_unused_parameters)
        return params, sparse

    class Record(TrainerCallback):
        def __init__(self, into: dict):
            self.into = into

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                params = list(model.named_parameters())
                self.into["trainable"] = sorted(n for n, p in params if p.requires_grad)
                self.into["with_grad"] = sorted(n for n, p in params if p.grad is not None)

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            self.into["optimizer_state"] = sorted(names[id(p)] for p in optimizer.state)
            self.into["groups"] = [len(g["params"]) for g in optimizer.param_groups]

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    DistributedDataParallel._build_params_for_reducer = bucketed
    try:
        whole = _ddp_run(out / "whole", [Record(record)])
        _ddp_run(out / "resumed", [StopAt2()])
        resumed = _ddp_run(out / "resumed", resume=True)
        record["lora"] = {}
        _ddp_run(out / "lora", [Record(record["lora"])], steps=1, lora=LoraSettings(r=2))
    finally:
        DistributedDataParallel._build_params_for_reducer = build
    return dict(record, whole=whole["train"]["loss_curve"], resumed=resumed["train"]["loss_curve"],
                resumed_from=resumed["resumed_from_step"])


def test_ddp_frozen_layers_get_no_gradient_bucket_or_state_and_resume_exactly(ranks):
    from salf.train.checkpoints import checkpoint_problem

    out = ranks / "ddp"
    for r in _rank_results(out):
        trainable = r["trainable"]
        assert trainable and all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm"))
                                 for n in trainable)
        assert r["with_grad"] == trainable                 # no frozen parameter has a gradient
        *runs, lora = r["buckets"]                     # whole, stopped, resumed, LoRA
        assert runs == [trainable] * 3                     # nor a DDP bucket
        assert r["find_unused"] == [False] * 4             # and DDP needs no graph walk
        norms = sum("norm" in n for n in trainable)
        assert r["groups"] == [len(trainable) - norms, norms]   # weight decay or not: norms
        assert r["optimizer_state"] == trainable           # nor optimizer state
        assert r["resumed_from"] == 2 and len(r["whole"]) == 4
        assert r["resumed"] == r["whole"]                  # bit-identical loss curve
        a = r["lora"]
        assert a["trainable"] == a["with_grad"] == a["optimizer_state"] == lora
        assert lora and all("lora_" in n and (".layers.2." in n or ".layers.3." in n) for n in lora)
        assert a["groups"] == [len(lora)]                  # the empty no-decay group dropped
    whole, resumed = (_tensors(out / d / "final" / "model.safetensors") for d in ("whole", "resumed"))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    ckpt = out / "resumed" / "checkpoints" / "checkpoint-4"
    assert checkpoint_problem(ckpt, processes=2) is None
    (ckpt / "rng_state_1.pth").unlink()
    assert checkpoint_problem(ckpt, processes=2) == "rng_state_1.pth is missing"


@pytest.mark.parametrize("engine, layout, first", [
    ("fsdp", {"pytorch_model_fsdp_0/.metadata": "", "optimizer_0/.metadata": ""}, "no FSDP model state"),
    ("deepspeed", {"latest": "global_step4", "global_step4/mp_rank_00_model_states.pt": ""},
     "no DeepSpeed state"),
])
def test_checkpoints_in_an_engines_layout_are_checked(tmp_path, engine, layout, first):
    """FSDP and DeepSpeed keep model and optimizer states in their own files (not run here:
    they need GPUs); a resume checks that those are present, with the rest."""
    from salf.train.checkpoints import checkpoint_problem

    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        torch.save({}, tmp_path / name)
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert checkpoint_problem(tmp_path, processes=2, engine=engine) is None
    assert checkpoint_problem(tmp_path, processes=2).startswith("no model weights")   # not DDP's
    (tmp_path / next(iter(layout))).unlink()
    assert checkpoint_problem(tmp_path, processes=2, engine=engine).startswith(first)


# ----------------------------------------------------------------------------- a moving cut under DDP

# the linear schedule from eof 1 over 8 steps, checked at every step: eof 2 after step 6
DYNAMIC = dict(eof=1, steps=8)


def _moving_cut(folder):
    from salf.dynamic import DynamicSettings, moving_cut

    return moving_cut(DynamicSettings(policy="linear", checks=8), out_dir=folder)


def _dynamic_part(rank: int, out: Path) -> dict:
    """A dynamic run (recording the gradients of the step after the first move), then the
    same run stopped at its step-6 checkpoint (the first move's) and resumed."""
    from transformers import TrainerCallback

    record: dict = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["find_unused"] = args.ddp_find_unused_parameters

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 6:       # the 7th step
                params = list(model.named_parameters())
                record["trainable"] = sorted(n for n, p in params if p.requires_grad)
                record["with_grad"] = sorted(n for n, p in params if p.grad is not None)

    class StopAt6(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    whole = _ddp_run(out / "whole", [Record(), _moving_cut(out / "whole")], **DYNAMIC)
    _ddp_run(out / "resumed", [StopAt6(), _moving_cut(out / "resumed")], **DYNAMIC)
    resumed = _ddp_run(out / "resumed", [_moving_cut(out / "resumed")], resume=True, **DYNAMIC)
    return dict(record, whole=whole["train"]["loss_curve"], resumed=resumed["train"]["loss_curve"],
                schedule=whole["dynamic"]["schedule"], resumed_schedule=resumed["dynamic"]["schedule"],
                audit=whole["dynamic"]["audit"]["ok"])


def test_a_moving_cut_under_ddp_is_the_one_process_run_and_resumes_exactly(ranks, tmp_path):
    one = _ddp_run(tmp_path / "one", [_moving_cut(tmp_path / "one")], batch_size=4, **DYNAMIC)
    schedule = one["dynamic"]["schedule"]
    assert len(schedule) >= 2 and schedule[1][0] == 6          # the resume point's move
    out = ranks / "dynamic"
    for r in _rank_results(out):
        assert r["schedule"] == r["resumed_schedule"] == schedule
        for a, b in zip(r["whole"], one["train"]["loss_curve"], strict=True):
            assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) <= LOSS_TOL
        assert r["find_unused"] is True          # DDP must find the layers frozen after the wrap
        eof_then = max(eof for step, eof in schedule if step <= 6)     # the cut at the 7th step
        frozen_then = [f".layers.{i}." for i in range(eof_then)]
        assert r["trainable"] and not any(f in n for f in frozen_then for n in r["trainable"])
        assert r["with_grad"] == r["trainable"]  # layers frozen mid-run get no gradient
        assert r["resumed"] == r["whole"] and r["audit"]
    whole, resumed = (_tensors(out / d / "final" / "model.safetensors") for d in ("whole", "resumed"))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    log = json.loads((out / "whole" / "dynamic.json").read_text())
    assert log["schedule"] == schedule            # written once, by rank 0


# ----------------------------------------------------------------------------- an undone move under DDP


def _undo_part(rank: int, out: Path) -> dict:
    """salf-budget's undo under DDP: a scripted policy moves the cut 0 -> 2 at step 2 and
    back to 1 at step 4 (the cut at the wrap is 0, so layer 2 is in DDP's buckets and may
    rejoin); recorded at the 6th step: what trains and has a gradient, and a digest of every
    weight at the end (the replicas must agree); then the same run stopped right after the
    undo and resumed."""
    from transformers import TrainerCallback

    from test_dynamic_budget import _move_then_undo, _registry, _StopAt

    record: dict = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                params = list(model.named_parameters())
                record["trainable"] = sorted(n for n, p in params if p.requires_grad)
                record["with_grad"] = sorted(n for n, p in params if p.grad is not None)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            from salf.train.audit import tensor_digest

            record["digest"] = {n: tensor_digest(p) for n, p in model.named_parameters()}

    settings = dict(policy="scripted", checks=8)
    with _registry({"scripted": _move_then_undo}):
        whole = _ddp_run(out / "whole", [Record(), _scripted_cut(out / "whole", settings)], eof=0, steps=8)
        _ddp_run(out / "resumed", [_StopAt(4), _scripted_cut(out / "resumed", settings)], eof=0, steps=8)
        resumed = _ddp_run(out / "resumed", [_scripted_cut(out / "resumed", settings)], eof=0, steps=8,
                           resume=True)
    return dict(record, schedule=whole["dynamic"]["schedule"], resumed_schedule=resumed["dynamic"]["schedule"],
                whole=whole["train"]["loss_curve"], resumed=resumed["train"]["loss_curve"],
                audit=whole["dynamic"]["audit"])


def _scripted_cut(folder, settings: dict):
    from salf.dynamic import DynamicSettings, moving_cut

    return moving_cut(DynamicSettings(**settings), out_dir=folder)


def test_an_undone_move_under_ddp_trains_again_on_every_rank_and_resumes_exactly(ranks):
    out = ranks / "undo"
    results = _rank_results(out)
    for r in results:
        assert r["schedule"] == r["resumed_schedule"] == [[0, 0], [2, 2], [4, 1]]
        assert any(".layers.1." in n for n in r["trainable"])          # layer 2 trains again
        assert not any(".layers.0." in n for n in r["trainable"])
        assert r["with_grad"] == r["trainable"]                        # and gets its gradient
        assert r["audit"]["ok"] and r["audit"]["undone_intervals"]
        assert r["resumed"] == r["whole"]                              # bit-identical loss curve
    assert results[0]["digest"] == results[1]["digest"]                # the replicas agree
    whole, resumed = (_tensors(out / d / "final" / "model.safetensors") for d in ("whole", "resumed"))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


# ----------------------------------------------------------------------------- analysis

ANALYSES = {   # a classification trace with the logit lens, an SFT trace sampling 2 targets per row
    "cls": dict(dataset_spec="rotten-tomatoes", samples=20, logit_lens=True),
    "sft": dict(dataset_spec="chatterbot", samples=10, max_targets=2),
}


def _analyses(out: Path | None) -> dict:
    from salf.pipeline import analyze

    return {name: analyze("tiny-llama", out_dir=out / name if out else None, batch_size=4,
                          progress=False, **kw).trace.to_dict()
            for name, kw in ANALYSES.items()}


def _analysis_part(rank: int, out: Path) -> dict:
    return _analyses(out)


def test_distributed_analysis_equals_one_process_analysis(ranks):
    out = ranks / "analysis"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # the workers' kernels, so that equal means bit-equal
    try:
        one = _analyses(None)
    finally:
        torch.set_num_threads(threads)
    for rank, traces in enumerate(_rank_results(out)):
        for name in ANALYSES:
            assert traces[name]["spaces"] == one[name]["spaces"], (rank, name)
            assert traces[name]["data"] == one[name]["data"]      # the same samples (sample hash)
            assert traces[name]["timing"]["processes"] == 2
    for name in ANALYSES:
        written = json.loads((out / name / "trace.json").read_text())
        assert written["spaces"] == one[name]["spaces"]
        assert sorted(p.name for p in (out / name).iterdir()) == \
            ["plan.json", "report.md", "trace.json", "trace.png"]


# ----------------------------------------------------------------------------- FSDP2

FSDP_EOF, FSDP_STEPS, GLOBAL_BATCH = 1, 3, (4, 16)


def _planned_tiny_llama():
    from salf.models.tiny import tiny_model
    from salf.plan import FreezePlan
    from salf.train.freeze import apply_plan

    return apply_plan(tiny_model("llama").train(), FreezePlan.manual(FSDP_EOF, 4))


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 512, GLOBAL_BATCH, generator=torch.Generator().manual_seed(step))


def _accelerate_fsdp2(model, rank: int):
    """FSDP2 laid out by accelerate's own fsdp2_prepare_model, as `accelerate launch --use_fsdp
    --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP` asks: one unit per decoder
    layer, embeddings + final norm (+ tied head) in one, the root. accelerate's Accelerator
    runs FSDP on accelerators only, so the function gets the few fields it reads."""
    from types import SimpleNamespace

    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
        cpu_ram_efficient_loading=False)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                  is_main_process=rank == 0, device=torch.device("cpu"),
                                  torch_device_mesh=None)
    return fsdp2_prepare_model(accelerator, model)


def _fsdp_part(rank: int, out: Path) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from salf import distributed
    from salf.train.audit import compare, snapshot
    from salf.train.freeze import assert_truncated

    distributed.init()
    model = _planned_tiny_llama()
    before = snapshot(model)
    model = _accelerate_fsdp2(model, rank)
    assert_truncated(model)                          # the cut hook and requires_grad survive the wrap
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, leaked, missing = [], set(), set()
    for step in range(FSDP_STEPS):
        ids = _batch(step).chunk(2)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        leaked |= {n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None}
        missing |= {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(distributed.all_gather(loss.item())) / 2)
    names = {id(p): n for n, p in model.named_parameters()}
    report = compare(before, snapshot(model, whole=distributed.whole_tensor), None, strict=False)
    return {
        "layer_units": [isinstance(layer, FSDPModule) for layer in model.model.layers],
        "root_unit": isinstance(model, FSDPModule), "losses": losses, "leaked": sorted(leaked),
        "missing": sorted(missing),
        "optimizer_state": sorted(names[id(p)] for p in optimizer.state),
        "trainable": sorted(before.trainable), "frozen": report["frozen"],
        "trainable_changed": report["trainable"]["changed"]}


def _one_process_losses() -> list[float]:
    model = _planned_tiny_llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(FSDP_STEPS):
        ids = _batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_fsdp2_in_accelerates_layout_trains_a_plan(ranks):
    one = _one_process_losses()
    for r in _rank_results(ranks / "fsdp"):
        assert r["layer_units"] == [True] * 4 and r["root_unit"]     # one unit per decoder layer
        assert all(abs(a - b) <= LOSS_TOL for a, b in zip(r["losses"], one, strict=True))
        assert r["leaked"] == [] and r["missing"] == []
        assert r["optimizer_state"] == r["trainable"]
        assert r["frozen"]["changed"] == [] and r["frozen"]["unchanged"] == r["frozen"]["count"] > 0
        assert r["trainable_changed"] == len(r["trainable"])


# ----------------------------------------------------------------------------- refusals


def _tiny_run(tmp_path, callbacks=()):
    from salf.data import load_dataset_spec
    from salf.models import load_model
    from salf.plan import FreezePlan
    from salf.train import train

    ds = load_dataset_spec("rotten-tomatoes", seed=0)
    model, tok, _ = load_model("tiny-llama")
    return train(model, tok, ds.task, (ds.splits["train"][:8], []), FreezePlan.manual(2, 4), tmp_path / "out",
                 TrainConfig(max_steps=1, batch_size=2, progress=False), callbacks)


@pytest.mark.parametrize("env, engine", [({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
                                         ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed")])
def test_dynamic_under_a_sharding_engine_is_refused_naming_it(tmp_path, monkeypatch, env, engine):
    from salf.dynamic import DynamicSettings, moving_cut

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", **env}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SalfError, match=f"^--dynamic runs in one process or under DDP: under {engine} "):
        _tiny_run(tmp_path, callbacks=[moving_cut(DynamicSettings(policy="linear"))])
    assert not (tmp_path / "out").exists()           # refused before anything was written


def test_fsdp_where_accelerate_would_fall_back_to_ddp_is_refused(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("accelerate runs FSDP here")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SalfError, match="^FSDP: accelerate runs FSDP on GPUs"):
        _tiny_run(tmp_path)
