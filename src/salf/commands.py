"""Handlers behind each `salf` verb: call the library, print with rich."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import checks
from .errors import ConfigError, SalfError
from .io import atomic_write_json, atomic_write_text

console = Console(highlight=False)


def dispatch(parser, args) -> int:
    handler = HANDLERS.get(args.verb)
    if handler is None:
        raise SalfError(f"unknown verb {args.verb!r}")
    try:
        checks.check_arguments(args)  # before any model (or torch) loads
        return handler(parser, args) or 0
    except ConfigError as exc:  # a setting's error, named as the flag the user typed
        raise SalfError(exc.cli_message()) from None


# ---------------------------------------------------------------- models
def cmd_models(parser, args) -> int:
    from .models import list_models

    if args.action in (None, "list"):
        table = Table(title="built-in models", title_justify="left")
        for col in ("name", "description", "source", "prepared"):
            table.add_column(col)
        for row in list_models():
            table.add_row(row["name"], row["description"], row["source"],
                          "yes" if row["prepared"] else "no")
        console.print(table)
        console.print("Any local Hugging Face folder or hub id (org/name) works as --model too.")
        return 0
    if args.action == "prepare":
        return _models_prepare(args.name, args.prompt)
    raise SalfError(f"unknown action {args.action!r}")


def _models_prepare(name: str, prompt: str) -> int:
    import torch

    from .models import anatomy, load_model, prepare_builtin, verify_anatomy

    if not name.startswith("tiny-"):
        prepare_builtin(name)
    model, tokenizer, info = load_model(name)
    anat = anatomy(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    verify_anatomy(anat, ids)
    next_id = int(out.logits[0, -1].argmax())
    console.print(f"[bold]{name}[/bold] ready at {info.name_or_path}")
    console.print(f"  family {info.model_type}, {anat.num_layers} decoder layers, "
                  f"{len(out.hidden_states)} latent spaces (embedding + each layer), "
                  f"hidden {out.hidden_states[0].shape[-1]}, vocab {anat.unembedding.shape[0]}, "
                  f"head {'tied' if anat.tied else 'untied'}")
    console.print(f"  weights hash {info.weights_hash}; anatomy check passed")
    console.print(f"  next token after {prompt!r}: {tokenizer.decode([next_id])!r}")
    return 0


# ---------------------------------------------------------------- datasets
def data_kwargs(args) -> dict:
    """The user-data column options shared by every verb that reads a dataset."""
    kw = dict(text_col=args.text_col, label_col=args.label_col, prompt_col=args.prompt_col,
              response_col=args.response_col, template=args.template,
              labels=args.labels)
    return {k: v for k, v in kw.items() if v is not None}


def cmd_datasets(parser, args) -> int:
    from .data import describe, list_datasets, load_dataset_spec

    if args.action in (None, "list"):
        table = Table(title="built-in datasets", title_justify="left")
        for col in ("name", "task", "description"):
            table.add_column(col)
        for row in list_datasets():
            table.add_row(row["name"], row["task"], row["description"])
        console.print(table)
        console.print("Local files: salf datasets show FILE --text-col C --label-col C "
                      "(or --prompt-col/--response-col)")
        return 0
    if args.action == "show":
        ds = load_dataset_spec(args.name, **data_kwargs(args))
        info = describe(ds)
        console.print(f"[bold]{ds.name}[/bold] — {info['task']}")
        table = Table(title_justify="left")
        table.add_column("split")
        table.add_column("rows", justify="right")
        keys = sorted({k for s in info["splits"].values() for k in s.get("labels", {})})
        for k in keys:
            table.add_column(k, justify="right")
        for split, s in info["splits"].items():
            table.add_row(split, str(s["rows"]), *[str(s.get("labels", {}).get(k, 0)) for k in keys])
        console.print(table)
        console.print("[bold]example[/bold] (formatted prompt, then target):")
        console.print(info["example"]["prompt"], markup=False)
        console.print(f"-> {info['example']['target']!r}", markup=False)
        if info.get("provenance"):
            console.print(f"source: {json.dumps(info['provenance'], default=str)}", markup=False)
        return 0
    raise SalfError(f"unknown action {args.action!r}")


# ---------------------------------------------------------------- analyze / plan
def trace_config(args):
    """The TraceConfig of the analysis flags: all of `salf analyze`'s, the shared "analysis"
    group of another verb's (its --batch-size, --seed, ... are the training run's). Checked
    when made: its ConfigError names the field, `dispatch` the flag (salf.config)."""
    from .config import TraceConfig

    fields = TraceConfig.cli_fields(None if args.verb == "analyze" else "analysis")
    return TraceConfig(**{f.name: getattr(args, f.name) for f in fields})


def cmd_analyze(parser, args) -> int:
    from .data import load_dataset_spec
    from .pipeline import analyze

    config = trace_config(args)
    ds = load_dataset_spec(args.dataset, **data_kwargs(args))  # data errors before the model loads
    result = analyze(args.model, args.dataset, out_dir=args.out, config=config,
                     data_kwargs=data_kwargs(args), trust_remote_code=args.trust_remote_code,
                     dataset=ds)
    print_trace_table(result)
    print_plan(result)
    console.print(f"wrote {result.out_dir}/trace.json, plan.json, report.md, trace.png")
    return 0


def cmd_plan(parser, args) -> int:
    from .pipeline import replan

    result = replan(args.trace, args.policy, head=args.head, out=args.out)
    print_plan(result, ranks=args.ranks, engine=args.engine)
    console.print(f"wrote {result.plan_path}")
    return 0


def print_trace_table(result) -> None:
    from .analysis import inference_gains

    tr = result.trace
    gains = inference_gains(tr)
    cuts = result.cost["cuts"]
    eof = result.plan.eof
    table = Table(title=f"trace: {tr.model.get('spec')} on {tr.data.get('dataset')} "
                        f"({tr.data.get('samples')} examples, {tr.task})", title_justify="left")
    cls = tr.task == "classification"
    cols = ["space", "D", "gain"] + (["lens acc", "AUC"] if cls else []) + ["cost if cut"]
    for c in cols:
        table.add_column(c, justify="right")
    for s in tr.spaces:
        l = s["space"]
        row = [str(l), f"{s['deviation']:.4f}", f"{gains[l - 1]:+.4f}" if l else ""]
        if cls:
            row += [_f(s.get("lens_acc")), _f(s.get("margin_auc"))]
        row.append(f"{cuts[l]['flops_ratio']:.2f}x" if l < tr.num_layers else "")  # a cut at L trains nothing
        style = "bold red" if l == eof else ("dim" if l < eof else None)
        table.add_row(*row, style=style)
    console.print(table)


def _f(v) -> str:
    return "" if v is None else f"{v:.3f}"


def print_plan(result, ranks: int | None = None, engine: str | None = None) -> None:
    """The chosen cut and its predicted cost; with `ranks`, the cluster table of
    salf.cluster.cluster_report (engine None: its default)."""
    plan, choice = result.plan, result.choice
    p = plan.predicted
    console.print(f"[bold]cut:[/bold] {plan.describe()}")
    console.print(f"  policy {plan.policy}: {choice['reason']}", markup=False)
    console.print(f"  predicted vs full fine-tuning: FLOPs {p['flops_ratio']:.2f}x "
                  f"(saving {1 - p['flops_ratio']:.0%}), memory {p['memory_ratio']:.2f}x, "
                  f"step time {p['step_time_ratio']:.2f}x")
    if ranks:
        from .cluster import DEFAULT_ENGINE, cluster_report

        # soft_wrap: a Markdown table must not be wrapped to the terminal's width
        console.print(cluster_report(result.cost, plan.eof, ranks, engine or DEFAULT_ENGINE),
                      markup=False, soft_wrap=True)


# ---------------------------------------------------------------- train / evaluate / finetune
def train_config(args):
    """The TrainConfig of the training flags, LoRA included."""
    return checks.train_config_of(args, lora=_lora(args))


def _lora(args):
    """The LoraSettings of --lora and its options, or None without --lora."""
    if not args.lora:
        return None
    from .train import LoraSettings

    return LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        target_modules=_lora_targets(args))


def _lora_targets(args) -> list[str] | None:
    if not (args.lora and args.lora_targets):
        return None
    return [t.strip() for t in args.lora_targets.split(",") if t.strip()]


def cmd_train(parser, args) -> int:
    from .data import load_dataset_spec
    from .models import anatomy, load_model
    from .finetune import check_probe_rows, resolve_plan, run_training
    from .train.freeze import check_lora_targets

    ds = load_dataset_spec(args.dataset, **data_kwargs(args))  # data errors before the model loads
    check_probe_rows(ds, checks.dynamic_settings_of(args))
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    model, _, info = loaded
    anat = anatomy(model)
    check_lora_targets(anat, _lora_targets(args))
    plan = resolve_plan(info, anat.num_layers, plan_path=args.plan, freeze_below=args.freeze_below,
                        full=args.full, head=args.head, tied=anat.tied,
                        allow_different_weights=args.allow_different_weights)
    console.print(f"[bold]plan:[/bold] {plan.describe()}" + (" + LoRA" if args.lora else ""))
    metrics = run_training(args.model, ds, plan, args.out, train_config(args), loaded=loaded,
                           run=run_options(args))
    print_train_summary(metrics, args.out)
    return 0


def print_train_summary(metrics: dict, out) -> None:
    t, p, a = metrics["timing"], metrics["params"], metrics["audit"]
    mem = metrics.get("memory", {})
    peak = mem.get("cuda_peak_allocated_bytes") or mem.get("peak_rss_bytes")
    console.print(f"trained {metrics['train']['steps']} steps, final loss "
                  f"{_f(metrics['train'].get('final_loss'))}; trainable {p['trainable']:,} of "
                  f"{p['total']:,} parameters ({p['trainable_fraction']:.1%})")
    if t.get("median_step_s"):
        console.print(f"median step {t['median_step_s']:.3f} s, {t['tokens_per_s']:.0f} tokens/s, "
                      f"peak memory {peak / 2**20:,.0f} MiB" if peak else "")
    if metrics.get("eval"):
        console.print("validation: " + ", ".join(f"{k} {_f(v) if isinstance(v, float) else v}"
                                                for k, v in metrics["eval"].items()))
    console.print(f"audit: {a['frozen_unchanged']}/{a['frozen_count']} frozen tensors bit-identical, "
                  f"{a['trainable_changed']}/{a['trainable_count']} trainable changed — "
                  + ("[green]ok[/green]" if a["ok"] else "[red]FAILED[/red]"))
    if metrics.get("dynamic"):
        print_dynamic_summary(metrics["dynamic"])
    console.print(f"wrote {out}/final, metrics.json, audit.json, plan.json"
                  + (", dynamic.json" if metrics.get("dynamic") else ""))


def print_dynamic_summary(d: dict) -> None:
    """The moving cut: its schedule, what the run cost, and the audit of what froze during it."""
    steps = " -> ".join(f"eof {k} " + (f"after step {s}" if s else "from the start")
                        for s, k in d["schedule"])
    console.print(f"[bold]dynamic {d['settings']['policy']}:[/bold] {steps}")
    cost, audit, probe = d.get("cost"), d.get("audit") or {}, d["probe"]
    if cost:
        reads = (f" (probes {cost['probe_share_of_run']:.1%} of it: {probe['reads']} reads of "
                 f"{probe['rows']} rows)" if probe["reads"] else "")
        console.print(f"  training FLOPs {cost['flops_ratio']:.2f}x full fine-tuning's{reads}")
    if audit:
        console.print(f"  {audit['frozen_during_run']} tensors frozen during the run, "
                      f"{len(audit['changed'])} changed after freezing — "
                      + ("[green]ok[/green]" if audit["ok"] else "[red]FAILED[/red]"))


def cmd_evaluate(parser, args) -> int:
    from .data import load_dataset_spec
    from .data import first_rows
    from .finetune import load_for_eval
    from .train import evaluate

    ds = load_dataset_spec(args.dataset, **data_kwargs(args))
    rows = first_rows(ds, args.split, args.samples)
    model, tok, meta = load_for_eval(args.model, trust_remote_code=args.trust_remote_code)
    metrics = evaluate(model, tok, ds.task, rows, batch_size=args.batch_size,
                       max_length=args.max_length, progress=True)
    metrics.update(model=args.model, dataset=ds.name, split=args.split)
    console.print(f"[bold]{args.model}[/bold] on {ds.name}/{args.split} ({metrics['n']} rows): "
                  + ", ".join(f"{k} {_f(v)}" for k, v in metrics.items()
                              if isinstance(v, float)))
    if args.out:
        atomic_write_json(args.out, metrics)
    return 0


def run_options(args):
    """The RunOptions of `salf train/finetune`: --train-samples, --eval-samples, --dynamic."""
    from .finetune import RunOptions

    return RunOptions(train_samples=args.train_samples, eval_samples=args.eval_samples,
                      dynamic=checks.dynamic_settings_of(args))


def cmd_finetune(parser, args) -> int:
    from .finetune import FinetuneOptions, finetune

    options = FinetuneOptions(analysis=trace_config(args), test_samples=args.test_samples)
    s = finetune(args.model, args.dataset, args.out, train_config(args), options=options,
                 run=run_options(args), data_kwargs=data_kwargs(args),
                 trust_remote_code=args.trust_remote_code)
    print_finetune_summary(s)
    return 0


def print_finetune_summary(s: dict) -> None:
    from .plan import FreezePlan

    plan = FreezePlan.from_dict(s["plan"])
    table = Table(title=f"salf finetune: {s['model']['spec']} on {s['dataset']} "
                        f"({s['test_rows']} test rows)", title_justify="left")
    table.add_column("")
    table.add_column("zero-shot", justify="right")
    table.add_column("fine-tuned", justify="right")
    for k in ("accuracy", "macro_f1", "loss", "label_loss", "perplexity"):
        if k in s["zero_shot"]:
            table.add_row(k, _f(s["zero_shot"][k]), _f(s["fine_tuned"][k]))
    console.print(table)
    m, p = s["measured"], s["predicted"]
    console.print(f"[bold]frozen:[/bold] {plan.describe()}" + (" + LoRA" if s.get("lora") else ""))
    console.print(f"  policy {plan.policy}: {plan.reason}", markup=False)
    console.print(f"  trainable {m['trainable_params']:,} of {m['total_params']:,} parameters; "
                  f"predicted {p['flops_ratio']:.2f}x FLOPs, {p['step_time_ratio']:.2f}x step time "
                  f"of full fine-tuning; measured step {_f(m['step_time_s'])} s over {m['steps']} steps")
    console.print(f"  analysis {s['analysis_s']:.0f} s, total {s['total_s']:.0f} s; "
                  f"outputs: {s['outputs']['analysis']}, {s['outputs']['model']}")
    if s.get("dynamic"):
        print_dynamic_summary(s["dynamic"])


# ---------------------------------------------------------------- sweep
def cmd_sweep(parser, args) -> int:
    from .sweep import SweepConfig, parse_selectors, refresh_report, run_sweep

    if args.report_only:
        if not (Path(args.out) / "sweep.json").exists():
            raise SalfError(f"{args.out}/sweep.json does not exist: no sweep has finished a cell "
                            "there yet")
        refresh_report(Path(args.out))
        console.print((Path(args.out) / "sweep.md").read_text(), markup=False)
        return 0

    cfg = SweepConfig(model=args.model, dataset=args.dataset, out=args.out,
                      cuts=checks.parse_cuts(args.cuts),
                      selectors=parse_selectors(args.selectors),
                      seeds=checks.parse_int_list(args.seeds, "--seeds"), steps=args.budget_steps,
                      batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                      test_samples=args.test_samples, samples=args.samples, head=args.head,
                      data_kwargs=data_kwargs(args), jobs=args.jobs, timeout_s=args.cell_timeout,
                      save_steps=args.save_steps)
    if run_sweep(cfg, log=lambda m: console.print(m, markup=False), dry_run=args.dry_run) is None:
        return 0  # --dry-run: the cell list is the output
    console.print((Path(args.out) / "sweep.md").read_text(), markup=False)
    console.print(f"wrote {args.out}/sweep.json, sweep.md, frontier.png")
    return 0


def cmd_export(parser, args) -> int:
    from .export import export_plan
    from .plan import FreezePlan

    text = export_plan(FreezePlan.from_json(args.plan), args.format, args.layers_path)
    if args.out:
        atomic_write_text(args.out, text)
        console.print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


HANDLERS = {"models": cmd_models, "datasets": cmd_datasets, "analyze": cmd_analyze,
            "plan": cmd_plan, "train": cmd_train, "evaluate": cmd_evaluate,
            "finetune": cmd_finetune, "export": cmd_export, "sweep": cmd_sweep}
