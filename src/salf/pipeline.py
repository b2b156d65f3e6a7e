"""Analyze and replan as library calls: trace a model, predict the cost of every cut, pick one.

`analyze` loads a model and data, traces the latent spaces, predicts the cost of
every cut, picks one with a policy and writes trace.json, plan.json, report.md
and trace.png. `replan` does the planning part again from a saved trace.
Training on a plan (and the whole `finetune` job) lives in `salf.finetune`.

Under torchrun / `accelerate launch`, `analyze` shards the batches across the processes and
reduces the statistics exactly (every rank gets the one-process trace); rank 0 writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from . import distributed
from .analysis import Trace, TraceMeta, choose_cut, fit_depth_law, trace
from .config import TraceConfig
from .cost import ModelShape, cost_table, plan_prediction
from .data import encode, load_dataset_spec, make_batches, sample_hash, sample_rows
from .errors import SalfError
from .io import ensure_out_dir, ensure_parent_dir
from .models import anatomy, load_model, verify_anatomy
from .plan import FreezePlan
from .report.markdown import write_analysis_report
from .report.plots import write_trace_plot


@dataclass
class Analysis:
    """What `analyze` and `replan` return."""

    trace: Trace
    plan: FreezePlan
    choice: dict                   # choose_cut's answer: the policy's reasoning and benefit curve
    cost: dict                     # the cost table the plan was priced with
    out_dir: Path | None = None    # the folder `analyze` wrote its outputs to
    plan_path: Path | None = None  # the plan file written (OUT/plan.json, or replan's `out`)


# ------------------------------------------------------------------------- analyze
def analyze(model_spec: str, dataset_spec: str, *, out_dir: str | Path | None = None,
            config: TraceConfig | None = None, data_kwargs: dict | None = None,
            trust_remote_code: bool = False, loaded=None, dataset=None, **options) -> Analysis:
    """Trace `model_spec` on `config.samples` rows of `dataset_spec`, choose a cut, write the
    outputs.

    `config`: the analysis options (a salf.config.TraceConfig; None: its defaults); keyword
    `options` named as its fields (samples=, policy=, max_targets=, ...) replace them.
    `loaded` = (model, tokenizer, info) and `dataset` = a TaskDataset skip reloading.
    `config.train_batch_size` / `train_max_length` describe the training run the cost model
    predicts. Under a launcher every process runs a share of the batches (see module doc).
    """
    config = TraceConfig.with_options(config, options, "analyze")
    distributed.init()
    model, tokenizer, info = loaded or load_model(model_spec, trust_remote_code=trust_remote_code)
    ds = dataset or load_dataset_spec(dataset_spec, seed=0, **(data_kwargs or {}))
    rows = _analysis_rows(ds, config)
    kind = ds.task.kind
    anat = anatomy(model)
    _verify_on_first_row(anat, ds.task, tokenizer, rows, config.max_length)
    shape = ModelShape.from_model(model)
    data_info = dict(ds.provenance, dataset=ds.name, split=config.split, samples=len(rows),
                     sample_hash=sample_hash(rows), max_length=config.max_length)
    run = replace(config, task_kind=kind, progress=config.progress and distributed.is_main(),
                  label_token_ids=ds.task.label_token_ids(tokenizer) if kind == "classification" else None)
    tr = trace(model, anat, make_batches(ds.task, tokenizer, rows, config.batch_size, config.max_length),
               run, meta=TraceMeta(model=info.to_dict(), data=data_info, shapes=shape.to_dict()),
               ranks=_ranks())
    cost = cost_table(shape, config.train_max_length, config.train_batch_size,
                      loss_positions="last" if kind == "classification" else "all", head=config.head)
    tr.extra["cost"] = cost
    tr.extra["task"] = ds.task.to_dict()
    result = _plan_from_trace(tr, config.policy, config.head, cost)
    if out_dir is not None:
        _write_analysis(Path(out_dir), result)
    return result


def _analysis_rows(ds, config: TraceConfig) -> list[dict]:
    """The analysis sample: `config.samples` rows of `config.split`, drawn with `config.seed`."""
    split = config.split
    if split not in ds.splits:
        raise SalfError(f"dataset {ds.name} has no split {split!r} (has: {', '.join(ds.splits)})")
    return sample_rows(ds.splits[split], config.samples, config.seed,
                       f"analysis sample of {ds.name}/{split}")


def _ranks() -> tuple[int, int] | None:
    """(rank, world size) under a launcher with several processes, else None."""
    return (distributed.rank(), distributed.world_size()) if distributed.world_size() > 1 else None


def _verify_on_first_row(anat, task, tokenizer, rows, max_length: int) -> None:
    """Check once, on a real input, that the resolved model parts recompute its logits."""
    first = encode(task, tokenizer, rows[:1], max_length)
    if first:
        import torch

        device = anat.model.get_input_embeddings().weight.device
        verify_anatomy(anat, torch.tensor([first[0]["input_ids"]], device=device))


def _write_analysis(out: Path, result: Analysis) -> None:
    """OUT/trace.json, plan.json, trace.png and report.md (written by rank 0)."""
    result.plan.trace_file = "trace.json"
    result.out_dir, result.plan_path = out, out / "plan.json"

    def write() -> None:
        ensure_out_dir(out)
        result.trace.to_json(out / "trace.json")
        result.plan.to_json(out / "plan.json")
        write_outputs(out, result.trace, result.plan, result.choice, result.cost)

    distributed.on_main(write)


def _plan_from_trace(tr: Trace, policy: str, head: str, cost: dict) -> Analysis:
    """Choose a cut of `tr` with `policy`, priced by the cost table `cost`."""
    flops = [c["flops_ratio"] for c in cost["cuts"]]
    choice = choose_cut(tr, policy, cost=flops)
    k = choice["eof"]
    predicted = dict(plan_prediction(cost["cuts"][k]), benefit=choice["benefit"],
                     predicted_deviation=choice["predicted"])
    plan = FreezePlan(eof=k, num_layers=tr.num_layers, head=head, policy=choice["policy"],
                      policy_params=choice["params"], reason=choice["reason"], model=dict(tr.model),
                      data=dict(tr.data), predicted=predicted)
    return Analysis(trace=tr, plan=plan, choice=choice, cost=cost)


def write_outputs(out: Path, tr: Trace, plan: FreezePlan, choice: dict, cost: dict) -> None:
    """report.md and trace.png for one analysis (the text first: a disk that fills up while
    the larger plot is drawn still leaves it)."""
    fit = fit_depth_law(tr)
    write_analysis_report(out / "report.md", tr, plan, choice, cost, fit)
    write_trace_plot(out / "trace.png", tr, plan, choice, cost, fit)


# ------------------------------------------------------------------------- replan
def replan(trace_path: str | Path, policy: str, head: str = "frozen",
           out: str | Path | None = None) -> Analysis:
    """Choose a cut from a saved trace.json without the model; writes the plan to `out`
    (default: plan-POLICY.json beside the trace)."""
    trace_path = Path(trace_path)
    if not trace_path.exists():
        raise SalfError(f"trace file {trace_path} does not exist")
    tr = Trace.from_json(trace_path)
    cost = _saved_cost_table(tr, trace_path)
    if cost["settings"].get("head") != head:
        cost = _cost_table_with_head(cost, head, trace_path)
    result = _plan_from_trace(tr, policy, head, cost)
    result.plan.trace_file = str(trace_path)
    if out is None:
        out = trace_path.parent / f"plan-{result.plan.policy.replace('=', '')}.json"
    result.plan_path = ensure_parent_dir(out)
    result.plan.to_json(result.plan_path)
    return result


def _saved_cost_table(tr: Trace, trace_path: Path) -> dict:
    """The cost table `analyze` stored in the trace (extra.cost), checked: one SalfError
    naming the file when it is missing or malformed."""
    cost = tr.extra.get("cost")
    if cost is None:
        raise SalfError(f"{trace_path} has no cost table (written by an older salf?); rerun analyze")

    def malformed(what: str) -> SalfError:
        return SalfError(f"{trace_path}: extra.cost {what}; rerun `salf analyze`")

    if not isinstance(cost, dict):
        raise malformed("is not an object")
    settings = cost.get("settings")
    if not isinstance(settings, dict) or not settings:
        raise malformed("has no settings")
    cuts = cost.get("cuts")
    n = tr.num_layers + 1
    if not (isinstance(cuts, list) and len(cuts) == n and all(_has_flops_ratio(c) for c in cuts)):
        raise malformed(f"needs 'cuts': {n} entries (eof 0..{n - 1}) with a finite flops_ratio")
    return cost


def _has_flops_ratio(entry) -> bool:
    v = entry.get("flops_ratio") if isinstance(entry, dict) else None
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cost_table_with_head(cost: dict, head: str, trace_path: Path) -> dict:
    """The cost table again with the trace's settings (its machine too) but `head`."""
    settings = dict(cost["settings"], head=head)
    try:
        shape = ModelShape.from_dict(cost.get("shape"))
        seq_len, batch_size = settings.pop("seq_len"), settings.pop("batch_size")
        return cost_table(shape, seq_len, batch_size, **settings)
    except KeyError as e:
        raise SalfError(f"{trace_path}: extra.cost.settings has no {e.args[0]}; rerun `salf analyze`") \
            from None
    except (TypeError, ValueError) as e:  # a setting this salf does not understand
        raise SalfError(f"{trace_path}: extra.cost.settings cannot be used: {e}") from None
    except SalfError as e:
        raise SalfError(f"{trace_path}: {e}") from None
