"""metrics.json: what a finished run reports (see docs/training.md, "metrics.json").

`build_metrics(...)` assembles the sections from the run's settings, what training
produced (a `TrainOutcome`) and the checks after it; callers add their own afterwards
(`metrics["dynamic"] = ...`), and callbacks add theirs through `metrics_section()`
(salf.train.extensions).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec; ru_maxrss does not
    (it keeps the parent's peak across fork+exec, so a child started by a process
    holding a big model would report the parent's memory).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        return None


def peak_memory() -> dict:
    out: dict = {}
    if torch.cuda.is_available():
        out["device"] = "cuda"
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["cuda_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    else:
        out["device"] = "cpu"
    hwm = peak_rss_bytes()
    if hwm is not None:
        out["peak_rss_bytes"] = hwm
    try:
        import psutil

        out["rss_bytes_at_end"] = int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        pass
    return out


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def loss_curve(history: list[dict]) -> list[dict]:
    """One {step, loss} per logged optimizer step."""
    return [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h and "step" in h]


def eval_curve(history: list[dict]) -> list[dict]:
    """One {step, <eval metric>...} per evaluation during training."""
    return [{"step": h["step"], **{k[5:]: v for k, v in h.items() if k.startswith("eval_") and k != "eval_runtime"}}
            for h in history if "eval_loss" in h]


def train_section(state, runtime_s, examples: int) -> dict:
    curve = loss_curve(state.log_history)
    return {
        "steps": state.global_step,
        "epoch": state.epoch,
        "examples": examples,
        "loss_curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
        "mean_loss": sum(p["loss"] for p in curve) / len(curve) if curve else None,
        "runtime_s": runtime_s,
    }


def audit_section(report: dict) -> dict:
    return {"ok": report["ok"], "frozen_unchanged": report["frozen"]["unchanged"],
            "frozen_count": report["frozen"]["count"],
            "trainable_changed": report["trainable"]["changed"],
            "trainable_count": report["trainable"]["count"]}


@dataclass(frozen=True)
class TrainOutcome:
    """What the training loop produced: the trainer's state, its runtime (seconds), the
    training examples, the step timing, the prefix cache's report (None without one) and
    the step a resumed run started from (None for a fresh run)."""

    state: object
    runtime_s: float | None
    examples: int
    timing: dict
    prefix_cache: dict | None = None
    resumed_from_step: int | None = None


def build_metrics(*, run: dict, plan: dict | None, counts: dict, outcome: TrainOutcome,
                  final_eval: dict | None, audit: dict, truncation: dict) -> dict:
    """metrics.json's sections, from the finished run's pieces."""
    state = outcome.state
    return {
        "plan": plan,
        "lora": run["lora"],
        "loss_kind": run["loss"],
        "settings": run,
        "params": {**counts, "trainable_fraction": counts["trainable"] / max(counts["total"], 1)},
        "train": train_section(state, outcome.runtime_s, outcome.examples),
        "eval_curve": eval_curve(state.log_history),
        "eval": final_eval,
        "timing": outcome.timing,
        "memory": peak_memory(),
        "truncation": truncation,
        "audit": audit_section(audit),
        "prefix_cache": outcome.prefix_cache,
        "resumed_from_step": outcome.resumed_from_step,
        "versions": versions(),
    }
