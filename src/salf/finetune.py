"""Training on a plan, as library calls: which plan a run uses, one training run, the whole job.

`resolve_plan` turns the CLI's choices (a plan file, a manual cut, full fine-tuning)
into a FreezePlan; `run_training` fine-tunes with it (a TrainConfig, and a RunOptions for
its rows and moving cut); `load_for_eval` is what evaluation loads (its rows:
salf.data.first_rows); `finetune` is analyze -> plan -> evaluate zero-shot -> train ->
evaluate, with summary.json (a FinetuneOptions for its analysis and test rows). The
analysis side lives in `salf.pipeline`. Under torchrun / accelerate launch every process
runs the job and rank 0 writes (see salf.distributed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import distributed
from .data import first_rows, load_dataset_spec, sample_rows
from .config import TraceConfig, TrainConfig
from .errors import SalfError
from .io import atomic_write_json, ensure_out_dir
from .models import anatomy, load_model
from .pipeline import analyze
from .plan import FreezePlan

if TYPE_CHECKING:  # salf.dynamic imports torch
    from .dynamic import DynamicSettings

# what `finetune` trains with unless told otherwise (the CLI's batch and length)
FINETUNE_CONFIG = TrainConfig(batch_size=16, max_length=96)


@dataclass(frozen=True)
class RunOptions:
    """What a training run takes beside its TrainConfig: `train_samples` rows of the train
    split train (a seeded sample; None: all), the first `eval_samples` of the validation
    split evaluate (0: none), and `dynamic`, a `salf.dynamic.DynamicSettings` (the cut moves
    while training; its probe rows come from the validation split) or None."""

    train_samples: int | None = None
    eval_samples: int = 500
    dynamic: DynamicSettings | None = None


@dataclass(frozen=True)
class FinetuneOptions:
    """What `finetune` does around the training run: `analysis`, the salf.config.TraceConfig
    of the analysis that chooses the plan (None: its defaults; its seed, and the batch and
    length its cost model prices, are the training run's), and the first `test_samples` test
    rows scored before and after training."""

    analysis: TraceConfig | None = None
    test_samples: int = 1000


def resolve_plan(info, num_layers: int, *, plan_path=None, freeze_below=None, full=False,
                 head: str | None = None, tied: bool = False, allow_different_weights=False):
    """The FreezePlan a training run uses: from a file, a manual cut, or full fine-tuning."""
    model_dict = dict(info.to_dict(), tied=tied)
    if full:
        return FreezePlan.full(num_layers, model=model_dict)
    if freeze_below is not None:
        if not 0 <= freeze_below < num_layers:
            raise SalfError(f"--freeze-below {freeze_below} is outside 0..{num_layers - 1} for a "
                            f"{num_layers}-layer model")
        return FreezePlan.manual(freeze_below, num_layers, head=head or "frozen", model=model_dict)
    plan = FreezePlan.from_json(plan_path)
    plan.check_model(info, num_layers, allow_different_weights=allow_different_weights)
    if head is not None:
        plan.head = head
    return plan


def run_training(model_spec: str, ds, plan, out_dir, config: TrainConfig | None = None, *, loaded=None,
                 run: RunOptions | None = None, callbacks=()) -> dict:
    """Fine-tune `model_spec` on `ds` with `plan` and `config` (a salf.config.TrainConfig; None:
    its defaults); returns metrics (also OUT/metrics.json).

    `run` (a RunOptions; None: its defaults) says which rows train and evaluate and whether
    the cut moves; `callbacks` go to `salf.train.train` (after the moving cut's, if any).
    `loaded` = (model, tokenizer, info) skips loading. final/salf.json names `model_spec` as
    the base unless `config.base_spec` says otherwise.
    """
    from .train import train
    from .train.progress import say

    from .dynamic.setup import moving_cut, split_off_probe

    config = config if config is not None else TrainConfig()
    run = run if run is not None else RunOptions()
    train_samples, eval_samples, dynamic = run.train_samples, run.eval_samples, run.dynamic
    if config.base_spec is None:
        config = replace(config, base_spec=model_spec)
    model, tokenizer, info = loaded or load_model(model_spec)
    splits, probe = split_off_probe(ds.splits, dynamic)
    train_rows = sample_rows(splits["train"], train_samples, config.seed, f"{ds.name}/train")
    # the first N validation rows (not a random sample): `salf evaluate --split validation
    # --samples N` then reproduces the eval recorded in metrics.json exactly
    eval_rows = (first_rows(ds, "validation", eval_samples)
                 if eval_samples and ds.splits.get("validation") else [])
    if eval_samples and not eval_rows:
        say(f"{ds.name} has no validation rows: training without evaluation "
            "(metrics.json eval: null)")
    callbacks = list(callbacks or [])
    if dynamic is not None:
        callbacks.append(moving_cut(dynamic, ds.task, tokenizer, probe, plan=plan, out_dir=out_dir,
                                    max_length=config.max_length))
    return train(model, tokenizer, ds.task, (train_rows, eval_rows), plan, out_dir, config, callbacks)


def check_probe_rows(ds, dynamic) -> None:
    """A probe the dataset cannot hold is refused before the model loads."""
    from .dynamic.setup import split_off_probe

    split_off_probe(ds.splits, dynamic)


def load_for_eval(spec: str, trust_remote_code: bool = False):
    """(model, tokenizer, meta) for a trained folder from `salf train` or any model spec."""
    from .train.evaluate import META_FILE, load_trained, read_meta

    if Path(spec).is_dir() and (Path(spec) / META_FILE).exists():
        model, tok = load_trained(spec)
        if tok is None:
            raise SalfError(f"{spec} has no tokenizer files")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return model, tok, read_meta(spec)
    model, tok, info = load_model(spec, trust_remote_code=trust_remote_code)
    return model, tok, {"base": spec}


def finetune(model_spec: str, dataset_spec: str, out_dir, config: TrainConfig | None = None, *,
             options: FinetuneOptions | None = None, run: RunOptions | None = None,
             data_kwargs: dict | None = None, trust_remote_code: bool = False) -> dict:
    """The whole job: analyze -> plan -> evaluate zero-shot -> train -> evaluate; summary.json.
    `config`: the training options (None: FINETUNE_CONFIG, batch 16 x 96 tokens); its seed,
    batch, length and progress serve the analysis too; `options`: the analysis and test rows
    (None: FinetuneOptions()); `run`: the training run's rows and moving cut, as in
    `run_training`; `data_kwargs` go to `load_dataset_spec`."""
    from .train import evaluate
    from .train.freeze import check_lora_targets

    config = config if config is not None else FINETUNE_CONFIG
    options = options if options is not None else FinetuneOptions()
    run = run if run is not None else RunOptions()
    out = ensure_out_dir(out_dir)
    t0 = time.perf_counter()
    progress = config.progress and distributed.is_main()
    max_length, lora = config.max_length, config.lora
    ds = load_dataset_spec(dataset_spec, seed=0, **(data_kwargs or {}))
    check_probe_rows(ds, run.dynamic)  # data errors before the model loads
    loaded = load_model(model_spec, trust_remote_code=trust_remote_code)
    model, tokenizer, info = loaded
    if lora is not None:  # a typo in a target costs no analysis
        check_lora_targets(anatomy(model), lora.target_modules)
    result = _analyze(model_spec, dataset_spec, out / "analysis", options, config, loaded, ds, progress)
    analysis_s = time.perf_counter() - t0
    rows = first_rows(ds, "test", options.test_samples)
    before = evaluate(model, tokenizer, ds.task, rows, batch_size=32, max_length=max_length,
                      progress=progress)
    plan = result.plan
    plan.model["tied"] = anatomy(model).tied
    metrics = run_training(model_spec, ds, plan, out / "train", replace(config, progress=progress),
                           loaded=loaded, run=run)
    trained = model if lora is None else None
    if trained is None:  # the PEFT wrapper is not returned by train(); reload the adapter
        trained, _, _ = load_for_eval(str(out / "train" / "final"))
    after = evaluate(trained, tokenizer, ds.task, rows, batch_size=32, max_length=max_length,
                     progress=progress)
    summary = {
        "model": info.to_dict(), "dataset": ds.name, "task": ds.task.kind, "test_rows": len(rows),
        "plan": plan.to_dict(), "lora": lora.to_dict() if lora else None,
        "zero_shot": before, "fine_tuned": after,
        "predicted": plan.predicted, "measured": _measured(metrics),
        "dynamic": metrics.get("dynamic"),
        "analysis_s": analysis_s, "total_s": time.perf_counter() - t0,
        "outputs": {"analysis": str(out / "analysis"), "model": str(out / "train" / "final")},
    }
    distributed.on_main(lambda: atomic_write_json(out / "summary.json", summary))
    return summary


def _analyze(model_spec: str, dataset_spec: str, out_dir: Path, options: FinetuneOptions,
             config: TrainConfig, loaded, ds, progress: bool):
    """finetune's analysis (salf.pipeline.analyze) on the loaded model and data; the cost model
    predicts the training run `config` describes."""
    analysis = replace(options.analysis or TraceConfig(), seed=config.seed,
                       train_batch_size=config.batch_size * config.grad_accum,
                       train_max_length=config.max_length, progress=progress)
    return analyze(model_spec, dataset_spec, out_dir=out_dir, config=analysis, loaded=loaded, dataset=ds)


def _measured(metrics: dict) -> dict:
    """What summary.json reports of the training run, beside the plan's predictions."""
    return {"step_time_s": metrics["timing"].get("median_step_s"),
            "peak_memory": metrics.get("memory"), "steps": metrics["train"]["steps"],
            "trainable_params": metrics["params"].get("trainable"),
            "total_params": metrics["params"].get("total")}
