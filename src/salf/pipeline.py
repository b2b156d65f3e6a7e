"""The analyze -> plan steps as library calls (the CLI and `finetune`/`sweep` compose these).

`analyze` loads a model and data, traces the latent spaces, predicts the cost of
every cut, picks one with a policy and writes trace.json, plan.json, report.md
and trace.png. `replan` does the planning part again from a saved trace.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .analysis import Trace, choose_cut, fit_depth_law, trace
from .cost import ModelShape, cost_table, plan_prediction
from .defaults import DEFAULT_ANALYSIS_SAMPLES, DEFAULT_POLICY
from .data import collate, encode, load_dataset_spec, pad_token_id, sample_hash
from .errors import SalfError
from .io import atomic_write_json
from .models import anatomy, load_model, verify_anatomy
from .plan import FreezePlan
from .report.markdown import write_analysis_report
from .report.plots import write_trace_plot


@dataclass
class Analysis:
    trace: Trace
    plan: FreezePlan
    choice: dict
    cost: dict
    out_dir: Path | None


def sample_rows(rows: list[dict], n: int | None, seed: int, what: str) -> list[dict]:
    """A seeded sample of n rows (all rows when n is None or >= len)."""
    if n is not None and n <= 0:
        raise SalfError(f"{what}: the number of examples must be positive, got {n}")
    if not rows:
        raise SalfError(f"{what}: the split is empty")
    if n is None or n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)


def make_batches(task, tokenizer, rows, batch_size: int, max_length: int) -> list[dict]:
    encoded = encode(task, tokenizer, rows, max_length)
    if not encoded:
        raise SalfError("no example left after tokenization (all responses empty or too long?)")
    pad = pad_token_id(tokenizer)
    return [collate(encoded[i:i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def analyze(model_spec: str, dataset_spec: str, *, out_dir: str | Path | None = None,
            samples: int = DEFAULT_ANALYSIS_SAMPLES, split: str = "train",
            policy: str = DEFAULT_POLICY,
            batch_size: int = 8, max_length: int = 128, max_targets: int = 16,
            logit_lens: bool = False, head: str = "frozen", seed: int = 0,
            train_batch_size: int = 16, train_max_length: int = 96, data_kwargs: dict | None = None,
            trust_remote_code: bool = False, progress: bool = True, loaded=None,
            dataset=None) -> Analysis:
    """Trace `model_spec` on `samples` rows of `dataset_spec`, choose a cut, write the outputs.

    `loaded` = (model, tokenizer, info) and `dataset` = a TaskDataset skip reloading.
    train_batch_size / train_max_length describe the training run the cost model predicts.
    """
    model, tokenizer, info = loaded or load_model(model_spec, trust_remote_code=trust_remote_code)
    ds = dataset or load_dataset_spec(dataset_spec, seed=0, **(data_kwargs or {}))
    if split not in ds.splits:
        raise SalfError(f"dataset {ds.name} has no split {split!r} (has: {', '.join(ds.splits)})")
    rows = sample_rows(ds.splits[split], samples, seed, f"analysis sample of {ds.name}/{split}")
    anat = anatomy(model)
    kind = ds.task.kind
    label_ids = ds.task.label_token_ids(tokenizer) if kind == "classification" else None
    batches = make_batches(ds.task, tokenizer, rows, batch_size, max_length)
    first = encode(ds.task, tokenizer, rows[:1], max_length)
    if first:
        import torch

        verify_anatomy(anat, torch.tensor([first[0]["input_ids"]]))
    shape = ModelShape.from_model(model)
    data_info = dict(ds.provenance, dataset=ds.name, split=split, samples=len(rows),
                     sample_hash=sample_hash(rows), max_length=max_length)
    tr = trace(model, anat, batches, kind, label_token_ids=label_ids,
               max_targets_per_example=max_targets, logit_lens=logit_lens, progress=progress,
               seed=seed, model_info=info.to_dict(), data_info=data_info, shapes=shape.to_dict())
    cost = cost_table(shape, train_max_length, train_batch_size,
                      loss_positions="last" if kind == "classification" else "all", head=head)
    tr.extra["cost"] = cost
    tr.extra["task"] = ds.task.to_dict()
    result = _plan_from_trace(tr, policy, head, cost)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tr.to_json(out / "trace.json")
        result.plan.trace_file = "trace.json"
        result.plan.to_json(out / "plan.json")
        write_outputs(out, tr, result.plan, result.choice, cost)
        result.out_dir = out
    return result


def _plan_from_trace(tr: Trace, policy: str, head: str, cost: dict) -> Analysis:
    flops = [c["flops_ratio"] for c in cost["cuts"]]
    choice = choose_cut(tr, policy, cost=flops)
    k = choice["eof"]
    predicted = dict(plan_prediction(cost["cuts"][k]), benefit=choice["benefit"],
                     predicted_deviation=choice["predicted"])
    plan = FreezePlan(eof=k, num_layers=tr.num_layers, head=head, policy=choice["policy"],
                      policy_params=choice["params"], reason=choice["reason"], model=dict(tr.model),
                      data=dict(tr.data), predicted=predicted)
    return Analysis(trace=tr, plan=plan, choice=choice, cost=cost, out_dir=None)


def replan(trace_path: str | Path, policy: str, head: str = "frozen",
           out: str | Path | None = None) -> Analysis:
    """Choose a cut from a saved trace.json without the model; writes the plan to `out`."""
    trace_path = Path(trace_path)
    if not trace_path.exists():
        raise SalfError(f"trace file {trace_path} does not exist")
    tr = Trace.from_json(trace_path)
    cost = tr.extra.get("cost")
    if cost is None:
        raise SalfError(f"{trace_path} has no cost table (written by an older salf?); rerun analyze")
    settings = dict(cost["settings"])
    if settings.get("head") != head:
        shape = ModelShape.from_dict(cost["shape"])
        settings.pop("machine", None)
        seq, bs = settings.pop("seq_len"), settings.pop("batch_size")
        settings["head"] = head
        cost = cost_table(shape, seq, bs, **settings)
    result = _plan_from_trace(tr, policy, head, cost)
    result.plan.trace_file = str(trace_path)
    if out is None:
        out = trace_path.parent / f"plan-{result.plan.policy.replace('=', '')}.json"
    result.plan.to_json(out)
    result.out_dir = Path(out)
    return result


def write_outputs(out: Path, tr: Trace, plan: FreezePlan, choice: dict, cost: dict) -> None:
    """trace.png and report.md for one analysis."""
    fit = fit_depth_law(tr)
    write_trace_plot(out / "trace.png", tr, plan, choice, cost, fit)
    write_analysis_report(out / "report.md", tr, plan, choice, cost, fit)


# ------------------------------------------------------------------------- training
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


def lora_settings(args_lora: bool, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                  targets: str | None = None):
    if not args_lora:
        return None
    from .train import LoraSettings

    return LoraSettings(r=r, alpha=alpha, dropout=dropout,
                        target_modules=[t.strip() for t in targets.split(",")] if targets else None)


def run_training(model_spec: str, ds, plan, out_dir, *, loaded=None, lora=None,
                 train_samples=None, eval_samples=500, seed=0, progress=True, **train_kwargs) -> dict:
    """Fine-tune `model_spec` on `ds` with `plan`; returns metrics (also OUT/metrics.json)."""
    from .train import train

    model, tokenizer, info = loaded or load_model(model_spec)
    train_rows = sample_rows(ds.splits["train"], train_samples, seed, f"{ds.name}/train")
    # the first N validation rows (not a random sample): `salf evaluate --split validation
    # --samples N` then reproduces the eval recorded in metrics.json exactly
    eval_rows = (test_rows(ds, "validation", eval_samples)
                 if eval_samples and ds.splits.get("validation") else [])
    return train(model, tokenizer, ds.task, train_rows, eval_rows, plan, out_dir, lora=lora,
                 seed=seed, progress=progress, base_spec=model_spec, **train_kwargs)


def test_rows(ds, split: str = "test", samples: int | None = None) -> list[dict]:
    """The first `samples` rows of a split (the split order is already seeded and fixed)."""
    if split not in ds.splits:
        raise SalfError(f"dataset {ds.name} has no split {split!r} (has: {', '.join(ds.splits)})")
    rows = ds.splits[split]
    if not rows:
        raise SalfError(f"dataset {ds.name}: split {split!r} is empty")
    if samples is not None and samples <= 0:
        raise SalfError(f"--samples must be positive, got {samples}")
    return rows[:samples] if samples else list(rows)


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


def finetune(model_spec: str, dataset_spec: str, out_dir, *,
             samples: int = DEFAULT_ANALYSIS_SAMPLES,
             policy: str = DEFAULT_POLICY, head: str = "frozen", max_targets: int = 16,
             logit_lens: bool = False, test_samples: int = 1000, lora=None,
             data_kwargs: dict | None = None, trust_remote_code: bool = False,
             progress: bool = True, seed: int = 0, batch_size: int = 16, max_length: int = 96,
             train_samples=None, eval_samples=500, **train_kwargs) -> dict:
    """The whole job: analyze -> plan -> evaluate zero-shot -> train -> evaluate; summary.json."""
    import time

    from .train import evaluate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loaded = load_model(model_spec, trust_remote_code=trust_remote_code)
    model, tokenizer, info = loaded
    ds = load_dataset_spec(dataset_spec, seed=0, **(data_kwargs or {}))
    result = analyze(model_spec, dataset_spec, out_dir=out / "analysis", samples=samples,
                     policy=policy, head=head, max_targets=max_targets, logit_lens=logit_lens,
                     seed=seed, train_batch_size=batch_size * train_kwargs.get("grad_accum", 1),
                     train_max_length=max_length, loaded=loaded, dataset=ds, progress=progress)
    analysis_s = time.perf_counter() - t0
    rows = test_rows(ds, "test", test_samples)
    before = evaluate(model, tokenizer, ds.task, rows, batch_size=32, max_length=max_length,
                      progress=progress)
    plan = result.plan
    plan.model["tied"] = anatomy(model).tied
    metrics = run_training(model_spec, ds, plan, out / "train", loaded=loaded, lora=lora,
                           train_samples=train_samples, eval_samples=eval_samples, seed=seed,
                           progress=progress, batch_size=batch_size, max_length=max_length,
                           **train_kwargs)
    trained = model if lora is None else None
    if trained is None:  # the PEFT wrapper is not returned by train(); reload the adapter
        trained, _, _ = load_for_eval(str(out / "train" / "final"))
    after = evaluate(trained, tokenizer, ds.task, rows, batch_size=32, max_length=max_length,
                     progress=progress)
    summary = {
        "model": info.to_dict(), "dataset": ds.name, "task": ds.task.kind, "test_rows": len(rows),
        "plan": plan.to_dict(), "lora": lora.to_dict() if lora else None,
        "zero_shot": before, "fine_tuned": after,
        "predicted": plan.predicted,
        "measured": {"step_time_s": metrics["timing"].get("median_step_s"),
                     "peak_memory": metrics.get("memory"), "steps": metrics["train"]["steps"],
                     "trainable_params": metrics["params"].get("trainable"),
                     "total_params": metrics["params"].get("total")},
        "analysis_s": analysis_s, "total_s": time.perf_counter() - t0,
        "outputs": {"analysis": str(out / "analysis"), "model": str(out / "train" / "final")},
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
