"""`salf train` on N processes under each engine, against one process with the same global batch.

For every engine asked for it runs the launcher command of docs/multi-gpu.md §1 (a plan
cut, fp32, a few steps, a checkpoint midway), then resumes the run from that checkpoint
with the same processes, and reports: the processes and engine the run recorded, the
largest |loss difference| from one process with N x the batch, the audit, whether OUT
holds exactly one set of outputs, and whether the resumed run's loss curve equals the
uninterrupted one.

    python bench/multi_gpu.py OUT [--engines ddp,fsdp,zero2,zero3] [--procs 2] [--model M]

On a machine with N GPUs (FSDP and DeepSpeed need GPUs: accelerate runs them on
accelerators only; ZeRO needs `pip install deepspeed`). `--engines ddp --model tiny-llama`
also runs on CPUs. Writes OUT/<engine>/ (the runs) and OUT/multi_gpu.md (the table).
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
LAUNCHERS = {
    "ddp": lambda n: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node", str(n)],
    "fsdp": lambda n: [*ACCELERATE, "--num_processes", str(n), "--use_fsdp", "--fsdp_version", "2",
                       "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                       "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                       "--fsdp_reshard_after_forward", "true"],
    "zero2": lambda n: [*ACCELERATE, "--num_processes", str(n), "--use_deepspeed", "--zero_stage", "2"],
    "zero3": lambda n: [*ACCELERATE, "--num_processes", str(n), "--use_deepspeed", "--zero_stage", "3",
                        "--zero3_init_flag", "false", "--zero3_save_16bit_model", "true"],
}
OUTPUTS = {"audit.json", "checkpoints", "final", "metrics.json", "plan.json", "run.json", "train_log.jsonl"}


def salf_train(args, out: Path, batch: int, resume: bool = False) -> list[str]:
    return ["-m", "salf", "train", "--model", args.model, "--dataset", args.dataset,
            "--freeze-below", str(args.cut), "--max-steps", str(args.steps),
            "--save-steps", str(args.steps // 2), "--batch-size", str(batch),
            "--eval-samples", "64", "--out", str(out), *(["--resume"] if resume else [])]


def run(cmd: list[str], log: Path) -> bool:
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode == 0


def losses(out: Path) -> list[float]:
    return [p["loss"] for p in json.loads((out / "metrics.json").read_text())["train"]["loss_curve"]]


def check(args, engine: str, root: Path, reference: list[float]) -> dict:
    """Run `engine`, then resume it from its midway checkpoint; what the table reports."""
    out = root / engine
    shutil.rmtree(out, ignore_errors=True)
    launcher = LAUNCHERS[engine](args.procs)
    if not run([*launcher, *salf_train(args, out, args.batch)], root / f"{engine}.log"):
        return {"engine": engine, "ok": False, "log": f"{engine}.log"}
    metrics = json.loads((out / "metrics.json").read_text())
    whole = losses(out)
    shutil.rmtree(out / "checkpoints" / f"checkpoint-{args.steps}")   # resume from the midway one
    resumed = run([*launcher, *salf_train(args, out, args.batch, resume=True)], root / f"{engine}-resume.log")
    return {"engine": engine, "ok": True,
            "recorded": f"{metrics['settings']['processes']} x {metrics['settings']['engine']}",
            "max_dloss": max(abs(a - b) for a, b in zip(whole, reference, strict=True)),
            "audit": (metrics["audit"]["ok"]
                      and metrics["audit"]["frozen_unchanged"] == metrics["audit"]["frozen_count"]),
            "one_set": {p.name for p in out.iterdir()} == OUTPUTS,
            "resume_equal": resumed and losses(out) == whole}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--engines", default="ddp,fsdp,zero2,zero3")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4, help="per process")
    args = ap.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    one = root / "one-process"
    shutil.rmtree(one, ignore_errors=True)
    if not run([sys.executable, *salf_train(args, one, args.batch * args.procs)], root / "one-process.log"):
        print(f"the one-process run failed: see {root / 'one-process.log'}")
        return 1
    rows = [check(args, e, root, losses(one)) for e in args.engines.split(",")]
    lines = [f"{args.model}, cut {args.cut}, {args.steps} steps, batch {args.batch} x {args.procs} "
             f"processes vs {args.batch * args.procs} x 1, fp32", "",
             "| engine | recorded | max abs loss diff | audit | one set of outputs | resume equal |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | failed: see {r['log']} |  |  |  |  |" if not r["ok"] else
                     f"| {r['engine']} | {r['recorded']} | {r['max_dloss']:.2e} | {r['audit']} | "
                     f"{r['one_set']} | {r['resume_equal']} |")
    (root / "multi_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
