"""Fine-tune the layers above the cut with the Hugging Face `Trainer`.

`train(...)` applies the plan (`apply_plan`), trains with a `Trainer` subclass
whose loss is salf's (label-token CE with `logits_to_keep=1` for
classification, response-token CE for SFT, or the full-sequence LM loss), and
writes into `out_dir`:

    checkpoints/checkpoint-N/   Trainer checkpoints (atomic: staged, then renamed)
    final/                      the model (safetensors) or LoRA adapter + tokenizer + salf.json
    metrics.json                loss/eval curves, step time, tokens/s, peak memory, params, plan
    audit.json                  frozen-unchanged / trainable-changed proof
    plan.json                   the plan as applied
    run.json                    the run's settings (a resume must match them)

See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from ..errors import SalfError
from ..io import atomic_write_json, publish_dir, read_json
from .audit import _plan_dict, compare, snapshot, write_audit
from .evaluate import META_FILE, batch_loss, batch_tokens, evaluate_examples
from .freeze import (LoraSettings, SalfFreezeCallback, apply_plan, assert_truncated, freeze_state,
                     parameter_counts)

_ARG_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
_TMP_CHECKPOINT = re.compile(r"^tmp-" + PREFIX_CHECKPOINT_DIR + r"-\d+$")
# settings a resumed run must share with the run it continues
_RESUME_KEYS = ("plan", "lora", "loss", "lr", "batch_size", "grad_accum", "max_length", "epochs",
                "max_steps", "seed", "bf16", "gradient_checkpointing", "n_train", "n_eval")


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return dict(self.examples[i], salf_index=i)  # the prefix cache finds its rows by index


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict:
        from ..data import collate

        batch = collate(examples, self.pad_id)
        if "salf_index" in examples[0]:
            batch["example_index"] = torch.tensor([e["salf_index"] for e in examples])
        return batch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepTimer(TrainerCallback):
    """Wall time and tokens of every optimizer step (on_step_begin .. on_step_end)."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._t0 = None
        self._tok0 = 0

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._t0 = time.perf_counter()
        self._tok0 = self.trainer_ref.salf_tokens

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return
        _sync()
        self.times.append(time.perf_counter() - self._t0)
        self.tokens.append(self.trainer_ref.salf_tokens - self._tok0)
        self._t0 = None

    def summary(self) -> dict:
        n = len(self.times)
        skip = 2 if n > 4 else (1 if n > 1 else 0)
        times, tokens = self.times[skip:], self.tokens[skip:]
        if not times:
            return {"steps_timed": 0, "warmup_skipped": skip, "median_step_s": None, "tokens_per_s": None}
        return {
            "steps_timed": len(times),
            "warmup_skipped": skip,
            "median_step_s": statistics.median(times),
            "mean_step_s": sum(times) / len(times),
            "tokens_per_step": sum(tokens) / len(tokens),
            "tokens_per_s": sum(tokens) / sum(times) if sum(times) > 0 else None,
        }


class SalfTrainer(Trainer):
    """`Trainer` with salf's loss, salf's evaluation and atomic checkpoints."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(self, *args, salf_loss: str = "label", salf_eval=None, salf_cache=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.salf_cache = salf_cache    # a PrefixCache, or None
        self.salf_loss = salf_loss
        self.salf_eval = salf_eval      # callable(model) -> dict, or None
        self.salf_tokens = 0
        self._salf_staging: str | None = None
        # our loss is a per-batch mean: let every transformers version divide it by the
        # accumulation steps (older ones skip that when the model "accepts loss kwargs")
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("example_index", None)
        if self.salf_cache is not None and index is not None:
            self.salf_cache.ensure(inputs, index)
            self.salf_cache.set_batch(index, inputs["attention_mask"])
        try:
            loss = batch_loss(model, inputs, self.salf_loss)
        finally:
            if self.salf_cache is not None:
                self.salf_cache.set_batch(None, None)
        self.salf_tokens += batch_tokens(inputs)
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        if self.salf_eval is None:
            return {}
        start = time.perf_counter()
        result = self.salf_eval(self.model)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.items() if isinstance(v, (int, float))}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- atomic checkpoints: the Trainer writes into tmp-checkpoint-N/checkpoint-N,
    #    which is renamed to checkpoint-N only once everything is on disk.
    def _get_output_dir(self, trial) -> str:
        if self._salf_staging is not None:
            return self._salf_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"tmp-{name}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging, exist_ok=True)
        self._salf_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._salf_staging = None
        if self.args.should_save:
            publish_dir(os.path.join(staging, name), os.path.join(run_dir, name))
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)


def last_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint (staging folders are never complete)."""
    if not os.path.isdir(checkpoint_dir):
        return None
    return get_last_checkpoint(str(checkpoint_dir))


def _clean_staging(checkpoint_dir: Path) -> None:
    if checkpoint_dir.is_dir():
        for p in checkpoint_dir.iterdir():
            if _TMP_CHECKPOINT.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


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


def _peak_memory() -> dict:
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


def _versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _base_spec(model: nn.Module, plan, base_spec) -> str | None:
    if base_spec is not None:
        return str(base_spec)
    info = getattr(plan, "model", None)
    if isinstance(info, dict):
        spec = info.get("spec") or info.get("name_or_path")
        if spec:
            return str(spec)
    spec = getattr(info, "spec", None)
    if spec:
        return str(spec)
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def _check_resume(run_file: Path, run: dict) -> None:
    if not run_file.is_file():
        return
    old = read_json(run_file, "run settings")
    diffs = [k for k in _RESUME_KEYS if json.dumps(old.get(k), sort_keys=True, default=str)
             != json.dumps(run.get(k), sort_keys=True, default=str)]
    if diffs:
        raise SalfError(f"cannot resume: the run in {run_file.parent} used different settings "
                        f"({', '.join(diffs)}); use another output folder or the same settings")


def train(model: nn.Module, tokenizer, task, train_rows, eval_rows, plan, out_dir, *,
          lora: LoraSettings | None = None, max_steps: int | None = None, epochs: float = 1,
          lr: float | None = None, batch_size: int = 8, grad_accum: int = 1, max_length: int = 128,
          bf16: bool = False, seed: int = 0, eval_steps: int | None = None, save_steps: int | None = None,
          resume: bool = False, gradient_checkpointing: bool = False, loss: str = "label",
          cache_prefix: bool = False,
          report_to: str = "none", progress: bool = True, weight_decay: float = 0.0,
          warmup_steps: int = 0, save_total_limit: int | None = None,
          base_spec: str | None = None, callbacks: list | None = None) -> dict:
    """Apply `plan` to `model`, fine-tune it, save it and return the metrics (also in metrics.json).

    `lr` defaults to 2e-4 with LoRA, 5e-5 otherwise. `max_steps` (if given)
    overrides `epochs`. With `save_steps`, checkpoints go to
    out_dir/checkpoints; `resume=True` continues from the newest complete one
    (a run with the same settings and seed ends bit-identical to an
    uninterrupted run on CPU). `callbacks` are extra `TrainerCallback`s.
    """
    from transformers import set_seed

    from ..data import encode, pad_token_id

    if isinstance(lora, dict):
        lora = LoraSettings.from_dict(lora)
    if loss not in ("label", "lm"):
        raise SalfError(f"unknown loss {loss!r}; expected 'label' or 'lm'")
    if report_to not in ("none", "tensorboard"):
        raise SalfError(f"report_to must be 'none' or 'tensorboard', not {report_to!r}")
    if report_to == "tensorboard":
        import importlib.util

        if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
            raise SalfError("report_to='tensorboard' needs the tensorboard package (pip install tensorboard)")
    if int(batch_size) < 1 or int(grad_accum) < 1:
        raise SalfError("batch_size and grad_accum must be at least 1")
    if max_steps is not None and int(max_steps) < 1:
        raise SalfError(f"max_steps must be at least 1, got {max_steps}")
    if lr is None:
        lr = 2e-4 if lora is not None else 5e-5
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    wall_start = time.perf_counter()

    train_rows, eval_rows = list(train_rows), list(eval_rows or [])
    if not train_rows:
        raise SalfError("no training rows")
    plan_dict = _plan_dict(plan)
    run = {
        "plan": {k: plan_dict.get(k) for k in ("eof", "num_layers", "head", "train_embeddings")} if plan_dict else None,
        "lora": lora.to_dict() if lora else None, "loss": loss, "lr": lr, "batch_size": int(batch_size),
        "grad_accum": int(grad_accum), "max_length": int(max_length), "epochs": epochs,
        "max_steps": max_steps, "seed": int(seed), "bf16": bool(bf16),
        "gradient_checkpointing": bool(gradient_checkpointing), "cache_prefix": bool(cache_prefix),
        "n_train": len(train_rows),
        "n_eval": len(eval_rows), "eval_steps": eval_steps, "save_steps": save_steps,
    }
    run_file = out / "run.json"
    resume_from = None
    if resume:
        _check_resume(run_file, run)
        _clean_staging(ckpt_dir)
        resume_from = last_checkpoint(ckpt_dir)
    elif last_checkpoint(ckpt_dir) is not None:
        raise SalfError(f"{ckpt_dir} already holds checkpoints; pass resume=True to continue that run "
                        "or choose another output folder")
    atomic_write_json(run_file, run)

    # 1. the plan (seeded: LoRA's initial weights come from the RNG)
    set_seed(int(seed))
    applied = freeze_state(model)
    if applied is None:
        model = apply_plan(model, plan, lora=lora, gradient_checkpointing=gradient_checkpointing)
    elif applied.eof != int(plan.eof) or (applied.lora is None) != (lora is None):
        raise SalfError("the model already has a different plan applied; pass a freshly loaded model")
    atomic_write_json(out / "plan.json", plan_dict)

    # 2. data
    train_examples = encode(task, tokenizer, train_rows, max_length)
    if not train_examples:
        raise SalfError("no training example survived encoding")
    eval_examples = encode(task, tokenizer, eval_rows, max_length) if eval_rows else []
    pad_id = pad_token_id(tokenizer)
    label_ids = task.label_token_ids(tokenizer) if getattr(task, "kind", None) == "classification" else None

    def run_eval(m):
        return evaluate_examples(m, task, eval_examples, pad_id, batch_size, label_token_ids=label_ids)

    before = snapshot(model)
    counts = parameter_counts(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    cache, cache_info = None, None
    if cache_prefix:
        from .prefix_cache import PrefixCache

        if plan_dict and plan_dict.get("train_embeddings"):
            raise SalfError("--cache-prefix needs a cut: full fine-tuning has no frozen prefix")
        if loss == "lm":
            raise SalfError("--cache-prefix supports the label/SFT loss, not the full-sequence "
                            "'lm' loss (its extra label token has no cached state)")
        eof = int(plan_dict["eof"]) if plan_dict else 0
        cache = PrefixCache(model, eof).attach()   # filled lazily, on each example's first step

    # 3. the Trainer
    do_eval = bool(eval_steps) and bool(eval_examples)
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=int(batch_size),
        per_device_eval_batch_size=int(batch_size),
        gradient_accumulation_steps=int(grad_accum),
        num_train_epochs=float(epochs),
        max_steps=int(max_steps) if max_steps else -1,
        learning_rate=float(lr),
        weight_decay=float(weight_decay),
        warmup_steps=int(warmup_steps),
        lr_scheduler_type="linear",
        optim="adamw_torch",
        bf16=bool(bf16),
        # bf16 without an accelerator must say so explicitly (CPU autocast), else TrainingArguments refuses
        use_cpu=bool(bf16) and not torch.cuda.is_available(),
        seed=int(seed),
        data_seed=int(seed),
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps" if do_eval else "no",
        eval_steps=int(eval_steps) if do_eval else None,
        save_strategy="steps" if save_steps else "no",
        save_steps=int(save_steps) if save_steps else 500,
        save_total_limit=save_total_limit,
        report_to=[] if report_to == "none" else ["tensorboard"],
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # apply_plan owns checkpointing (trainable layers only); older transformers call it gradient_*
        **({"activation_checkpointing": False} if "activation_checkpointing" in _ARG_FIELDS
           else {"gradient_checkpointing": False}),
    )
    trainer = SalfTrainer(
        model=model, args=args, train_dataset=_Examples(train_examples), salf_cache=cache,
        eval_dataset=_Examples(eval_examples) if do_eval else None,
        data_collator=_Collator(pad_id), salf_loss=loss,
        salf_eval=run_eval if eval_examples else None,
        callbacks=[SalfFreezeCallback(), *(callbacks or [])],
    )
    if not progress:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    timer = _StepTimer(trainer)
    trainer.add_callback(timer)

    result = trainer.train(resume_from_checkpoint=resume_from)
    if cache is not None:
        cache.detach()
        cache_info = {"bytes": cache.nbytes, "examples": len(cache.states)}
    # drop accelerate's mixed-precision forward wrapper, so the final evaluation runs the same
    # forward as the saved model does when reloaded
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    truncation = assert_truncated(model)

    # 4. final evaluation, audit, save
    final_eval = run_eval(model) if eval_examples else None
    after = snapshot(model)
    report = compare(before, after, plan, strict=False)
    write_audit(out / "audit.json", report)
    if not report["ok"]:
        raise SalfError(f"audit failed (see {out / 'audit.json'}): {report['violations'][0]}")

    staging = out / ".tmp-final"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    meta = {"base": _base_spec(model, plan, base_spec), "lora": lora.to_dict() if lora else None,
            "plan": plan_dict, "task": task.to_dict() if hasattr(task, "to_dict") else None,
            "max_length": int(max_length), "loss": loss}
    atomic_write_json(staging / META_FILE, meta)
    publish_dir(staging, out / "final")

    history = trainer.state.log_history
    loss_curve = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h and "step" in h]
    eval_curve = [{"step": h["step"], **{k[5:]: v for k, v in h.items() if k.startswith("eval_")
                                          and k != "eval_runtime"}}
                  for h in history if "eval_loss" in h]
    metrics = {
        "plan": plan_dict,
        "lora": lora.to_dict() if lora else None,
        "loss_kind": loss,
        "settings": run,
        "params": {**counts, "trainable_fraction": counts["trainable"] / max(counts["total"], 1)},
        "train": {
            "steps": trainer.state.global_step,
            "epoch": trainer.state.epoch,
            "examples": len(train_examples),
            "loss_curve": loss_curve,
            "final_loss": loss_curve[-1]["loss"] if loss_curve else None,
            "mean_loss": sum(p["loss"] for p in loss_curve) / len(loss_curve) if loss_curve else None,
            "runtime_s": result.metrics.get("train_runtime"),
        },
        "eval_curve": eval_curve,
        "eval": final_eval,
        "timing": {**timer.summary(), "wall_s": time.perf_counter() - wall_start},
        "memory": _peak_memory(),
        "truncation": truncation,
        "audit": {"ok": report["ok"], "frozen_unchanged": report["frozen"]["unchanged"],
                  "frozen_count": report["frozen"]["count"],
                  "trainable_changed": report["trainable"]["changed"],
                  "trainable_count": report["trainable"]["count"]},
        "prefix_cache": cache_info,
        "resumed_from_step": int(resume_from.rsplit("-", 1)[-1]) if resume_from else None,
        "versions": _versions(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
