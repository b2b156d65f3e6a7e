"""Fine-tune the layers above the cut with the Hugging Face `Trainer`.

`train(...)` is a list of named steps: check the arguments, prepare the run folder
(run.json, resume point), apply the plan, encode the data, build the Trainer, run it,
finalise (evaluation, audit, final/) and write metrics.json. It writes into `out_dir`:

    checkpoints/checkpoint-N/   Trainer checkpoints (atomic; the last `save_total_limit` kept)
    final/                      the model (safetensors) or LoRA adapter + tokenizer + salf.json
    metrics.json                loss/eval curves, step time, tokens/s, peak memory, params, plan
    train_log.jsonl             one line per step and per evaluation (train_log.csv on request)
    audit.json                  frozen-unchanged / trainable-changed proof
    plan.json                   the plan as applied
    run.json                    the run's settings (a resume must match them)

Under torchrun / accelerate launch every process runs `train` (the Trainer's engine: DDP,
FSDP, DeepSpeed); rank 0 alone writes OUT and hands its decisions (the resume point, a
refusal) to the others. See docs/training.md and docs/multi-gpu.md.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import distributed
from ..config import TrainConfig
from ..errors import ConfigError, SalfError
from ..io import atomic_write_json, disk_full_is_an_error, publish_dir, read_json
from . import extensions
from .audit import compare, plan_as_dict, snapshot, write_audit
from .checkpoints import clean_staging, last_checkpoint, load_callback_states, resume_point, step_of
from .evaluate import META_FILE, evaluate_examples
from .freeze import (SalfFreezeCallback, apply_plan, assert_truncated, freeze_state,
                     parameter_counts)
from .interrupt import StopOnInterrupt
from .metrics import TrainOutcome, build_metrics
from .progress import ProgressBars, quiet_saves, say
from .steplog import StepLog
from .trainer import Data, build_trainer, check_engine, training_arguments

CHECKPOINTS = "checkpoints"
# settings a resumed run must share with the run it continues: the config's fields marked
# "resume" (salf.config) and what the run adds; callbacks add theirs through run_settings()
# (salf.train.extensions)
RESUME_KEYS = ("plan", *TrainConfig.resume_fields(), "n_train", "n_eval", "callbacks", "processes",
               "engine")
# what a run.json written before a key existed meant by it
RESUME_DEFAULTS = {"processes": 1, "engine": None, "weight_decay": 0.0, "warmup_steps": 0}


@dataclass
class Run:
    """One train() call: its folder, run.json settings, callbacks and resume point."""
    out: Path
    settings: dict
    callbacks: list
    resume_from: str | None = None


def train(model: nn.Module, tokenizer, task, rows, plan, out_dir, config: TrainConfig | None = None,
          callbacks=()) -> dict:
    """Apply `plan` to `model`, fine-tune it with `config` (a salf.config.TrainConfig; None:
    its defaults), save it into `out_dir` and return the metrics (also in metrics.json).

    `rows`: the training rows, or a tuple (train_rows, eval_rows). A resumed run
    (config.resume) with the same settings and seed ends bit-identical to an uninterrupted
    run on CPU. Ctrl-C saves a checkpoint at the end of the step and raises
    KeyboardInterrupt. `callbacks` are extra `TrainerCallback`s; see salf.train.extensions
    for what they may add to checkpoints, run.json and metrics.json; a moving cut is one of
    them (salf.dynamic.moving_cut). Under a launcher every process calls `train` with the
    same arguments; rank 0 writes OUT and every rank returns the metrics.
    """
    wall_start = time.perf_counter()
    config = config if config is not None else TrainConfig()
    train_rows, eval_rows = split_rows(rows)
    plan_dict = plan_as_dict(plan)
    # a callback that moves the cut comes last: it acts on what the others saw at a step
    callbacks = [SalfFreezeCallback(), *sorted(callbacks or [], key=_moves_cut)]
    run = Run(Path(out_dir), run_settings(plan_dict, config, callbacks, n_train=len(train_rows),
                                          n_eval=len(eval_rows)), callbacks)
    out = run.out
    distributed.init()
    run.resume_from = distributed.on_main(lambda: prepare_run_folder(out, run.settings, config.resume,
                                                                     callbacks))
    model = _apply_plan(model, plan, plan_dict, config, out)
    data = encode_data(task, tokenizer, train_rows, eval_rows, config.max_length)
    progress = config.progress and distributed.is_main()
    evaluate = _evaluator(task, data, config.batch_size, progress) if data.eval else None
    before, counts = snapshot(model), parameter_counts(model)
    cache = _prefix_cache(model, plan_dict, moving=any(map(_moves_cut, callbacks))) if config.cache_prefix else None
    extensions.attach(callbacks, model, cache, _cost_settings(model, task, plan_dict, config))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    trainer, stopper, step_log = _trainer(model, data, run, evaluate, cache, progress)
    result = run_trainer(trainer, run.resume_from, stopper, callbacks)
    model, cache_info = _trained_model(trainer, cache)
    truncation = assert_truncated(model)
    final_eval = evaluate(model) if evaluate else None
    audit = _audit(before, model, plan, out)
    _save_final(model, tokenizer, out, _final_meta(model, task, plan, plan_dict, config),
                state_dict=_whole_weights(trainer))

    outcome = TrainOutcome(trainer.state, result.metrics.get("train_runtime"), len(data.train),
                           timing={**step_log.summary(), "wall_s": time.perf_counter() - wall_start},
                           prefix_cache=cache_info,
                           resumed_from_step=step_of(run.resume_from) if run.resume_from else None)
    metrics = build_metrics(run=run.settings, plan=plan_dict, counts=counts, outcome=outcome,
                            final_eval=final_eval, audit=audit, truncation=truncation)
    metrics.update(extensions.metrics_sections(callbacks))
    distributed.on_main(lambda: atomic_write_json(out / "metrics.json", metrics))
    distributed.barrier()   # every rank returns once OUT is complete
    return metrics


# ----------------------------------------------------------------------------- the steps


def split_rows(rows) -> tuple[list, list]:
    """(train_rows, eval_rows) of train()'s `rows`: a tuple of both, or the training rows."""
    train_rows, eval_rows = rows if isinstance(rows, tuple) else (rows, [])
    train_rows, eval_rows = list(train_rows), list(eval_rows or [])
    if not train_rows:
        raise SalfError("no training rows")
    return train_rows, eval_rows


def run_settings(plan_dict: dict | None, config: TrainConfig, callbacks, **context) -> dict:
    """run.json: the config as it is (TrainConfig.record) and what the run adds: the plan's cut,
    `context` (row counts), the processes and engine, the callbacks' run_settings(); a resume
    must match RESUME_KEYS."""
    plan_keys = ("eof", "num_layers", "head", "train_embeddings", "layers")
    return {
        "plan": {k: plan_dict.get(k) for k in plan_keys} if plan_dict else None,
        **config.record(), **context,
        "processes": distributed.world_size(), "engine": distributed.engine(),
        "callbacks": extensions.run_settings(callbacks) or None,
    }


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _same(old, new) -> bool:
    """Equal settings; a number equals itself written as an int or a float (1 and 1.0)."""
    numbers = (int, float)
    if isinstance(old, numbers) and isinstance(new, numbers) and not isinstance(old, bool) \
            and not isinstance(new, bool):
        return old == new
    return _canonical(old) == _canonical(new)


def _differences(name: str, old, new):
    """(dotted name, old, new) of each differing leaf: a nested setting (plan, lora, a
    callback's settings) is named down to the field that changed, not dumped whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(f"{name}.{key}", old.get(key), new.get(key))
    elif not _same(old, new):
        yield name, old, new


def check_resume(run_file: Path, run: dict, keys, callbacks=()) -> None:
    """Refuse to continue a run (run.json) whose `keys` differ from this one's; without
    run.json there is nothing to compare (prepare_run_folder refuses checkpoints without one).
    The callbacks read their own old record (extensions.recorded_settings)."""
    if not run_file.is_file():
        return
    old = read_json(run_file, "--resume:")
    if not isinstance(old, dict):
        raise SalfError(f"--resume: {run_file} is not a salf run.json (expected a JSON object)")
    old = {**RESUME_DEFAULTS, **old}
    old["callbacks"] = extensions.recorded_settings(callbacks, old.get("callbacks"))
    diffs = [d for k in keys for d in _differences(k, old.get(k), run.get(k))]
    if diffs:
        shown = "; ".join(f"{name} {_canonical(a)} (now {_canonical(b)})" for name, a, b in diffs)
        raise SalfError(f"--resume: the run in {run_file.parent} used other settings: {shown}; "
                        "resume with the same settings or choose another --out folder")


def prepare_run_folder(out: Path, run: dict, resume: bool, callbacks) -> str | None:
    """Write run.json; with `resume`, check it first and return the good checkpoint to
    continue from (None: start afresh)."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / CHECKPOINTS
    resume_from = None
    if resume:
        if not (out / "run.json").is_file() and last_checkpoint(ckpt_dir) is not None:
            # a checkpoint brings back its own learning-rate schedule, optimizer and data order
            # whatever this run asks for; only run.json says which settings wrote it
            raise SalfError(f"--resume: {out / 'run.json'} is missing, so the settings of the run "
                            f"that wrote the checkpoints in {ckpt_dir} cannot be checked against "
                            "this one's; restore that run.json, or start a new run in another "
                            "--out folder")
        check_resume(out / "run.json", run, RESUME_KEYS, callbacks)
        clean_staging(ckpt_dir)
        resume_from = resume_point(ckpt_dir, callbacks, run["processes"], run["engine"])
        if resume_from:
            say(f"salf: resuming from {Path(resume_from).name}")
    elif last_checkpoint(ckpt_dir) is not None:
        raise SalfError(f"{ckpt_dir} already holds checkpoints; rerun with --resume to continue that run "
                        "or choose another --out folder")
    atomic_write_json(out / "run.json", run)
    return resume_from


def _apply_plan(model: nn.Module, plan, plan_dict, config: TrainConfig, out: Path) -> nn.Module:
    """Apply the plan (seeded: LoRA's initial weights come from the RNG) and write plan.json."""
    from transformers import set_seed

    set_seed(config.seed)
    applied = freeze_state(model)
    if applied is None:
        model = apply_plan(model, plan, lora=config.lora, gradient_checkpointing=config.gradient_checkpointing,
                           allow_different_weights=config.allow_different_weights)
    elif applied.eof != int(plan.eof) or (applied.lora is None) != (config.lora is None):
        raise SalfError("the model already has a different plan applied; pass a freshly loaded model")
    distributed.on_main(lambda: atomic_write_json(out / "plan.json", plan_dict))
    return model


def encode_data(task, tokenizer, train_rows: list, eval_rows: list, max_length: int) -> Data:
    from ..data import encode, pad_token_id

    train_examples = encode(task, tokenizer, train_rows, max_length)
    if not train_examples:
        raise SalfError("no training example survived encoding")
    label_ids = task.label_token_ids(tokenizer) if getattr(task, "kind", None) == "classification" else None
    return Data(train=train_examples,
                eval=encode(task, tokenizer, eval_rows, max_length) if eval_rows else [],
                pad_id=pad_token_id(tokenizer), label_ids=label_ids)


def _evaluator(task, data: Data, batch_size: int, progress: bool):
    def evaluate(model):
        return evaluate_examples(model, task, data.eval, data.pad_id, batch_size,
                                 label_token_ids=data.label_ids, progress=progress)
    return evaluate


def _moves_cut(callback) -> bool:
    return bool(getattr(callback, "moves_cut", False))


def _cost_settings(model, task, plan_dict, config: TrainConfig) -> dict:
    """The cost model's settings for this run's steps (what a dynamic schedule integrates)."""
    from ..cost import ModelShape
    from .freeze import unwrap

    classification = getattr(task, "kind", None) == "classification" and config.loss == "label"
    lora = config.lora
    return {"shape": ModelShape.from_model(unwrap(model)), "seq_len": config.max_length,
            "batch_size": config.batch_size * config.grad_accum,
            "loss_positions": "last" if classification else "all",
            "head": (plan_dict or {}).get("head") or "frozen", "lora_rank": lora.r if lora else None,
            "gradient_checkpointing": config.gradient_checkpointing}


def _prefix_cache(model: nn.Module, plan_dict, moving: bool = False):
    """A PrefixCache at the cut, filled lazily on each example's first step (with a moving
    cut it follows the cut, so it may start with nothing frozen; the 'lm' loss is refused
    by TrainConfig)."""
    from .prefix_cache import PrefixCache

    if plan_dict and plan_dict.get("train_embeddings"):
        raise ConfigError("cache_prefix", "needs a cut: full fine-tuning has no frozen prefix")
    if distributed.sharded():
        name = distributed.ENGINE_NAMES[distributed.engine()]
        raise ConfigError("cache_prefix", f"skips the frozen layers, whose shards every {name} process "
                                          "must gather together; use it with DDP or one process")
    eof = int(plan_dict["eof"]) if plan_dict else 0
    if eof < 1 and not moving:
        raise ConfigError("cache_prefix", "needs a cut with at least one frozen layer (eof >= 1)")
    return PrefixCache(model, eof).attach()


def _trainer(model, data: Data, run: Run, evaluate, cache, progress: bool):
    """(trainer, Ctrl-C stopper, step log) of `run`, reading its run.json settings."""
    settings, resume_from = run.settings, run.resume_from
    moving = any(map(_moves_cut, run.callbacks))
    args = training_arguments(run.out / CHECKPOINTS, settings,
                              do_eval=bool(settings["eval_steps"]) and bool(data.eval), moving_cut=moving)
    stopper = StopOnInterrupt()
    trainer = build_trainer(model, args, data, settings, evaluate=evaluate, cache=cache,
                            callbacks=[*run.callbacks, stopper], resumed_from=resume_from)
    check_engine(trainer)
    step_log = StepLog(run.out, lambda: trainer.salf_tokens, csv=settings["report_to"] == "csv",
                       resume_step=step_of(resume_from) if resume_from else None)
    trainer.add_callback(step_log)
    if progress:
        trainer.add_callback(ProgressBars(step_log))
    return trainer, stopper, step_log


def _final_meta(model: nn.Module, task, plan, plan_dict, config: TrainConfig) -> dict:
    """final/salf.json: what a reload needs (the base model, LoRA, the plan, the task)."""
    return {"base": _base_spec(model, plan, config.base_spec),
            "lora": config.lora.to_dict() if config.lora is not None else None, "plan": plan_dict,
            "task": task.to_dict() if hasattr(task, "to_dict") else None,
            "max_length": config.max_length, "loss": config.loss}


def run_trainer(trainer, resume_from: str | None, stopper: StopOnInterrupt, callbacks):
    """trainer.train(), with the callbacks' saved states handed back first and Ctrl-C
    deferred to the end of a step (salf.train.interrupt)."""
    if resume_from:
        load_callback_states(resume_from, callbacks)
    with stopper.catching_sigint():
        result = trainer.train(resume_from_checkpoint=resume_from)
    if stopper.stopped_at is not None:
        say(f"salf: stopped at step {stopper.stopped_at}; saved {PREFIX_CHECKPOINT_DIR}-{stopper.stopped_at}")
        raise KeyboardInterrupt(f"stopped at step {stopper.stopped_at}")
    if stopper.requested:
        say("salf: training had finished; writing the final model (Ctrl-C again to stop at once)")
    return result


def _trained_model(trainer, cache) -> tuple[nn.Module, dict | None]:
    """The trained model, without accelerate's mixed-precision forward wrapper (so the final
    evaluation runs the forward the saved model runs when reloaded); the cache detached."""
    cache_info = None
    if cache is not None:
        cache.detach()
        cache_info = {"bytes": cache.nbytes, "examples": len(cache.states), "eof": cache.eof}
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False), cache_info


def _audit(before, model: nn.Module, plan, out: Path) -> dict:
    """Compare the weights with those at apply_plan time (sharded ones gathered whole first);
    rank 0 writes audit.json, every rank fails on a violation."""
    after = snapshot(model, whole=distributed.whole_tensor if distributed.sharded() else None)
    report = compare(before, after, plan, strict=False)
    distributed.on_main(lambda: write_audit(out / "audit.json", report))
    if not report["ok"]:
        raise SalfError(f"audit failed (see {out / 'audit.json'}): {report['violations'][0]}")
    return report


def _whole_weights(trainer) -> dict | None:
    """The weights a sharding engine (FSDP, DeepSpeed) holds in pieces, gathered whole by
    accelerate (every rank calls); None for a model every process holds whole."""
    return trainer.accelerator.get_state_dict(trainer.model_wrapped) if distributed.sharded() else None


def _save_final(model: nn.Module, tokenizer, out: Path, meta: dict, state_dict: dict | None = None) -> None:
    """OUT/final, published whole by rank 0; `state_dict`: the full weights a sharding engine
    gathered (accelerator.get_state_dict), None for a whole model."""
    def save() -> None:
        staging = out / ".tmp-final"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with disk_full_is_an_error(out / "final"):
                with quiet_saves():
                    model.save_pretrained(str(staging), state_dict=state_dict)
                tokenizer.save_pretrained(str(staging))
                atomic_write_json(staging / META_FILE, meta)
        except SalfError:
            shutil.rmtree(staging, ignore_errors=True)   # a full disk: free what was staged
            raise
        publish_dir(staging, out / "final")

    distributed.on_main(save)


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
