"""salf's stable public API (docs/api.md): what `import salf` gives.

    analysis = salf.analyze(model, rows, tokenizer=tok)       # where to cut, on your data
    model = salf.freeze(model, analysis.plan)                # or a plan.json path, or an int cut
    trainer.add_callback(salf.MovingCut(eval_rows, collator=trainer.data_collator))

Everything here takes what a Hugging Face Trainer user already has — a model, a tokenizer, a
`datasets.Dataset` or a list of tokenized rows, the Trainer's data collator — and wraps
salf's internals (salf.pipeline, salf.train.apply_plan, salf.dynamic.DynamicFreezeCallback),
which may change; these names and arguments do not.

The moving cut and the Trainer's optimizer: the Trainer builds its optimizer over the
parameters that require grad when training starts (or earlier, when the user built it). A
parameter that starts requiring grad after that never joins it (the LISA bug, LMFlow #726),
and a frozen parameter that keeps its optimizer state keeps its memory and, with weight
decay, could still move. `MovingCut` therefore never changes the optimizer's parameter
groups: a parameter frozen by a move stays listed but loses its gradient and its state (no
PyTorch optimizer touches a parameter without a gradient), one that trains again after a
move back is still listed and starts with fresh state, and at the start of training every
parameter that requires grad must be in the optimizer (else one SalfError names them). The
groups are then the same in a run and in its resume (the checkpoint's optimizer state loads
into the optimizer the Trainer builds afresh), and the callback's own state travels in the
checkpoint's trainer_state.json (the Trainer's `stateful_callbacks`), read back at
`on_train_begin` before the first step, where the cut is re-applied.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from . import distributed
from .defaults import DEFAULT_ANALYSIS_SAMPLES, DEFAULT_POLICY
from .errors import SalfError
from .plan import FreezePlan

PROBE_MAX_LENGTH = 256      # tokens kept per probe / analysis row (the rest is cut off)
BATCH_SIZE = 8              # rows per forward pass of the analysis and the probe
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "completion_mask", "assistant_masks",
                  "position_ids", "token_type_ids")


class ArgumentTypeError(SalfError, TypeError):
    """An argument of the wrong type: a SalfError (one line) that is also a TypeError."""


# ------------------------------------------------------------------------------- freeze
def freeze(model, plan, *, lora=None, head: str = "frozen", gradient_checkpointing: bool = False,
           allow_different_weights: bool = False):
    """Freeze `model` below the cut of `plan` and truncate backward there; returns the model.

    `plan` is a FreezePlan, its dict, the path of a plan.json (`salf analyze` / `salf plan`
    write one), or an int: the cut itself (`eof`: the embeddings and decoder layers 1..eof
    are frozen, eof+1..L train; `head` says what the LM head does then). `lora` (a
    LoraSettings or a dict of its fields) trains LoRA adapters on the layers above the cut
    only, and returns the PEFT model. Call it before the Trainer builds its optimizer (before
    `trainer.train()`): LoRA adapters and an untied head copy are new parameters.

    Example::

        import salf
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        model = salf.freeze(model, 20)                    # freeze embeddings + layers 1-20 of 30
        model = salf.freeze(fresh_model, "runs/a/plan.json", lora={"r": 16})
    """
    from .models.anatomy import anatomy
    from .train import apply_plan

    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"salf.freeze: model must be a torch.nn.Module (a Hugging Face causal LM), "
                                f"got {type(model).__name__}")
    return apply_plan(model, as_plan(plan, anatomy(model), head), lora=lora,
                      gradient_checkpointing=gradient_checkpointing,
                      allow_different_weights=allow_different_weights)


def as_plan(plan, anat, head: str = "frozen") -> FreezePlan:
    """A FreezePlan from what `freeze` accepts (see there), checked against the model's
    anatomy `anat` where the plan is a bare cut."""
    if isinstance(plan, FreezePlan):
        return plan
    if isinstance(plan, dict):
        return FreezePlan.from_dict(plan, source="plan")
    if isinstance(plan, (str, os.PathLike)):
        return FreezePlan.from_json(plan)
    if isinstance(plan, int) and not isinstance(plan, bool):
        return FreezePlan.manual(plan, anat.num_layers, head=head,
                                 model={"num_layers": anat.num_layers, "tied": anat.tied,
                                        "model_type": getattr(anat.model.config, "model_type", None)})
    raise ArgumentTypeError(f"salf.freeze: plan must be a FreezePlan, its dict, a plan.json path or an "
                            f"int cut, got {type(plan).__name__}")


# ------------------------------------------------------------------------------- rows
def rows_of(data, n: int | None, what: str, seed: int = 0) -> list[dict]:
    """Up to `n` rows (a seeded sample, in order) of a `datasets.Dataset` or a list of dicts."""
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ArgumentTypeError(f"{what} must be a datasets.Dataset or a list of rows (dicts), "
                                f"got {type(data).__name__}")
    total = len(data)
    if total == 0:
        raise SalfError(f"{what} has no rows")
    picked = range(total) if n is None or n >= total else sorted(random.Random(seed).sample(range(total), n))
    rows = [data[i] for i in picked]
    if not all(isinstance(r, dict) for r in rows):
        raise ArgumentTypeError(f"{what}: every row must be a dict (e.g. {{'input_ids': [...]}}), got "
                                f"{type(next(r for r in rows if not isinstance(r, dict))).__name__}")
    return rows


def _is_numeric(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def tokenized(row: dict, tokenizer, max_length: int, what: str) -> dict:
    """The row's numeric fields, sequences cut to `max_length`; a row with only `text` is
    tokenized with `tokenizer`."""
    if "input_ids" not in row:
        if isinstance(row.get("text"), str) and tokenizer is not None:
            row = {"input_ids": tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]}
        else:
            raise SalfError(f"{what}: rows must be tokenized (an input_ids field), or have a text field and "
                            f"come with tokenizer=; this row has {', '.join(map(str, row)) or 'no field'} "
                            "(pass the Trainer's own datasets, which SFTTrainer has tokenized)")
    n = len(row["input_ids"])
    out = {}
    for key, value in row.items():
        if not _is_numeric(value):
            continue
        if key in _SEQUENCE_KEYS and not isinstance(value, int) and len(value) == n:
            value = value[:max_length] if isinstance(value, torch.Tensor) else list(value[:max_length])
        out[key] = value
    if n == 0:
        raise SalfError(f"{what}: a row has no tokens")
    return out


def pad_collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids, attention_mask and labels (-100 at padding; labels default to the
    input ids, or to the completion tokens where a completion_mask says which)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids, mask, labels = [], [], []
    for r in rows:
        x = [int(t) for t in r["input_ids"]]
        pad = width - len(x)
        m = [int(v) for v in r.get("attention_mask", [1] * len(x))]
        y = r.get("labels")
        if y is None:
            keep = r.get("completion_mask") or m
            y = [t if k else -100 for t, k in zip(x, keep)]
        ids.append(x + [pad_id] * pad)
        mask.append(m + [0] * pad)
        labels.append([int(t) for t in y] + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def lm_batch(batch, what: str) -> dict:
    """What salf reads from a collated batch: input_ids, attention_mask, labels (-100 where no
    loss), as CPU tensors."""
    if not isinstance(batch, dict) and hasattr(batch, "keys"):
        batch = dict(batch)
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise SalfError(f"{what}: the collator must return a dict with input_ids")
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() != 2:
        raise SalfError(f"{what}: the collator's input_ids must be (batch, length), got shape {tuple(ids.shape)}")
    if "attention_mask" not in batch and "position_ids" in batch and ids.shape[0] == 1:
        raise SalfError(f"{what}: padding-free (packed) batches cannot be read; give a collator that pads "
                        "(e.g. SFTConfig(padding_free=False))")
    mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids))).long()
    labels = batch.get("labels")
    labels = ids.masked_fill(mask == 0, -100) if labels is None else torch.as_tensor(labels).long()
    return {"input_ids": ids.long().cpu(), "attention_mask": mask.cpu(), "labels": labels.cpu()}


def lm_batches(data, *, collator=None, tokenizer=None, rows: int | None = None,
               max_length: int = PROBE_MAX_LENGTH, what: str = "data") -> list[dict]:
    """`data` (a datasets.Dataset or list of rows, tokenized or with `text`) as salf's batches:
    the rows sampled, cut to `max_length`, collated by `collator` (the Trainer's data collator)
    or padded with `tokenizer`'s pad token."""
    from .data import pad_token_id

    if collator is not None and not callable(collator):
        raise ArgumentTypeError(f"{what}: collator must be callable (the Trainer's data_collator), "
                                f"got {type(collator).__name__}")
    encoded = [tokenized(r, tokenizer, max_length, what) for r in rows_of(data, rows, what)]
    if collator is None and tokenizer is None and len({len(r["input_ids"]) for r in encoded}) > 1:
        raise SalfError(f"{what}: rows of different lengths need collator= (the Trainer's data_collator) or "
                        "tokenizer= (for its pad token)")
    collate = collator or (lambda b: pad_collate(b, pad_token_id(tokenizer) if tokenizer is not None else 0))
    out = [lm_batch(collate(encoded[i:i + BATCH_SIZE]), what) for i in range(0, len(encoded), BATCH_SIZE)]
    if not any(bool((b["labels"][:, 1:] != -100).any()) for b in out):
        raise SalfError(f"{what}: no token carries a loss (every label is -100)")
    return out


# ------------------------------------------------------------------------------- analyze
def analyze(model, data, *, tokenizer=None, collator=None, policy: str = DEFAULT_POLICY,
            samples: int = DEFAULT_ANALYSIS_SAMPLES, head: str = "frozen", out_dir=None):
    """Trace how the model's representation moves toward your data's targets, layer by layer,
    price every cut, and pick one (docs/method.md). Returns an `Analysis`: `.plan` (a
    FreezePlan for `salf.freeze`), `.trace`, `.choice` (the policy's reasoning), `.cost`.

    `model`: a loaded causal LM, with `data` a `datasets.Dataset` or list of rows — tokenized
    (`input_ids`, optional `labels` with -100 where no loss, e.g. the Trainer's train dataset
    after SFTTrainer tokenized it) or with a `text` field and `tokenizer=` — collated by
    `collator` (the Trainer's data collator) or padded with `tokenizer`. The loss positions
    are the targets (all tokens without `labels`). Or `model` a salf model spec
    (`smollm2-135m`, a local folder) with `data` a dataset spec (built-in name, .csv/.jsonl
    path), as `salf analyze` takes them. `samples` rows are read (a seeded sample), `policy`
    picks the cut (`salf plan --help`), `head` is the plan's head; `out_dir` also writes
    trace.json, plan.json, report.md and trace.png there. (The options go into a
    salf.config.TraceConfig, checked before anything is read.)

    Example::

        import salf
        analysis = salf.analyze(model, trainer.train_dataset, collator=trainer.data_collator)
        print(analysis.plan.describe())     # freeze embeddings + layers 1-12 of 30, train 13-30, ...
        model = salf.freeze(model, analysis.plan)
    """
    from .config import TraceConfig

    config = TraceConfig(policy=policy, samples=samples, head=head)
    if isinstance(model, (str, os.PathLike)):
        from .pipeline import analyze as analyze_spec

        if not isinstance(data, (str, os.PathLike)):
            raise ArgumentTypeError("salf.analyze: with a model spec, data must be a dataset spec (a built-in "
                                    f"name or a file path), got {type(data).__name__}")
        return analyze_spec(str(model), str(data), out_dir=out_dir, config=config)
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"salf.analyze: model must be a torch.nn.Module or a model spec, "
                                f"got {type(model).__name__}")
    batches = lm_batches(data, collator=collator, tokenizer=tokenizer, rows=config.samples,
                         what="salf.analyze data")
    result = _analysis(model, batches, config)
    if out_dir is not None:
        _write(Path(out_dir), result)
    return result


def _analysis(model, batches: list[dict], config):
    """Trace, cost table and cut of `model` on the LM batches (pipeline.analyze's steps), with
    the TraceConfig `config`'s policy and head."""
    from dataclasses import replace

    from .analysis import TraceMeta, choose_cut, trace
    from .cost import ModelShape, cost_table, plan_prediction
    from .data import sample_hash
    from .models import anatomy, weights_hash
    from .pipeline import Analysis

    anat = anatomy(model)
    shape = ModelShape.from_model(model)
    info = {"spec": model.config.name_or_path or "model", "name_or_path": model.config.name_or_path or "model",
            "weights_hash": weights_hash(model), "num_layers": anat.num_layers,
            "model_type": getattr(model.config, "model_type", None), "tied": anat.tied}
    tokens = [int(m.sum()) for b in batches for m in b["attention_mask"]]
    data_info = {"dataset": "user rows", "samples": len(tokens),
                 "sample_hash": sample_hash([b["input_ids"].tolist() for b in batches])}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tr = trace(model, anat, batches, replace(config, task_kind="sft", progress=False),
                       meta=TraceMeta(model=info, data=data_info, shapes=shape.to_dict()))
    finally:
        model.train(was_training)
    seq_len = max(1, sorted(tokens)[len(tokens) // 2])
    cost = cost_table(shape, seq_len, BATCH_SIZE, loss_positions="all", head=config.head)
    tr.extra["cost"] = cost
    choice = choose_cut(tr, config.policy, cost=[c["flops_ratio"] for c in cost["cuts"]])
    k = choice["eof"]
    predicted = dict(plan_prediction(cost["cuts"][k]), benefit=choice["benefit"],
                     predicted_deviation=choice["predicted"])
    plan = FreezePlan(eof=k, num_layers=anat.num_layers, head=config.head, policy=choice["policy"],
                      policy_params=choice["params"], reason=choice["reason"], model=info,
                      data=dict(tr.data), predicted=predicted)
    return Analysis(trace=tr, plan=plan, choice=choice, cost=cost)


def _write(out: Path, result) -> None:
    from .io import ensure_out_dir
    from .pipeline import write_outputs

    def write() -> None:
        ensure_out_dir(out)
        result.plan.trace_file = "trace.json"
        result.trace.to_json(out / "trace.json")
        result.plan.to_json(out / "plan.json")
        write_outputs(out, result.trace, result.plan, result.choice, result.cost)

    result.out_dir, result.plan_path = out, out / "plan.json"
    distributed.on_main(write)


# ------------------------------------------------------------------------------- the moving cut
def _optimizer_params(optimizer) -> dict[int, torch.Tensor]:
    inner = getattr(optimizer, "optimizer", optimizer)    # accelerate's AcceleratedOptimizer wraps one
    return {id(p): p for group in inner.param_groups for p in group["params"]}


def drop_frozen_state(optimizer, model) -> int:
    """Drop the optimizer state (AdamW's moments) of every parameter of `model` that no longer
    requires grad, and its gradient; returns the bytes freed. The parameter groups are kept."""
    if optimizer is None:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)
    freed = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        p.grad = None
        for value in inner.state.pop(p, {}).values():
            if isinstance(value, torch.Tensor):
                freed += value.numel() * value.element_size()
    return freed


def check_in_optimizer(model, optimizer, when: str) -> None:
    """Every parameter that requires grad is one the optimizer updates (the LISA bug: one
    made trainable after the optimizer was built would silently never train)."""
    if optimizer is None:
        return
    listed = _optimizer_params(optimizer)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in listed]
    if missing:
        raise SalfError(f"{when}: {len(missing)} trainable tensor(s) are not in the optimizer "
                        f"({', '.join(missing[:3])}): they became trainable after it was built and would "
                        "never train; call salf.freeze(model, plan) before the Trainer builds its optimizer")


class MovingCut(TrainerCallback, ExportableState):
    """A Trainer callback that moves the cut deeper while training, from what the model being
    trained says (docs/method.md, "Dynamic freezing"): at `checks` evenly spaced steps it reads
    a small held-out probe set (or the gradient norms, per `policy`) and freezes more of the
    prefix once those layers have settled. The move is real: gradients, optimizer state,
    hooks; every tensor frozen (from the start or by a move) is proved bit-identical at the
    end of training (a SalfError otherwise), and the Trainer's checkpoints carry its state, so
    `trainer.train(resume_from_checkpoint=...)` continues the same schedule.

    `probe`: held-out rows (a datasets.Dataset or list of rows, tokenized or with `text`, never
    the training rows — e.g. the Trainer's eval dataset), collated by `collator` (the
    Trainer's `data_collator`) or padded with `tokenizer`; a sample of `probe_rows` of them
    (default 16) is read at each check, cut to `max_length` tokens. Policies that read no
    probe (`linear`, `freezeout`, `autofreeze`) need none. `plan`: the starting cut, applied
    at the start of training when the model has none (a FreezePlan, plan.json path or int
    cut; no LoRA or untied head this way: use `salf.freeze` first for those). `out_dir`:
    where dynamic.json (every check and decision) is written. Other keywords are the
    settings of `salf train --dynamic` (`checks`, `probe_rows`, `max_eof`, `tau`, `epsilon`,
    `start`, ...; docs/method.md lists them).

    It runs in one process or under DDP (`ddp_find_unused_parameters=True`), with gradient
    accumulation, and whether it is added before or after the optimizer exists; it refuses
    FSDP and DeepSpeed (their optimizer shards are built for one trainable set).

    Example::

        import salf
        model = salf.freeze(model, 4)                     # the starting cut
        trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=held_out)
        trainer.add_callback(salf.MovingCut(trainer.eval_dataset, collator=trainer.data_collator))
        trainer.train()                                   # salf: step 40: ... cut 4 -> 12 (...)
    """

    def __init__(self, probe=None, *, collator=None, tokenizer=None, policy: str = "salf", plan=None,
                 out_dir: str | Path | None = None, max_length: int = PROBE_MAX_LENGTH, **settings):
        from .dynamic import DynamicFreezeCallback, DynamicSettings, Probe

        self.settings = DynamicSettings.from_dict({"policy": policy, **settings})
        needs_probe = "probe" in self.settings.needs
        if needs_probe and probe is None:
            raise SalfError(f"salf.MovingCut: policy {policy!r} reads a held-out probe set: pass "
                            "MovingCut(held_out_rows, collator=trainer.data_collator)")
        self._probe = None
        if needs_probe:
            batches = lm_batches(probe, collator=collator, tokenizer=tokenizer, rows=self.settings.probe_rows,
                                 max_length=max_length, what="salf.MovingCut probe")
            self._probe = Probe(batches, "sft")
        self.plan = plan
        self.out_dir = out_dir
        self.audit_report: dict | None = None
        self._inner = DynamicFreezeCallback(self.settings, self._probe,
                                            out_dir=Path(out_dir) if out_dir is not None else None)
        self._digests: dict[str, str] | None = None      # tensors frozen at the start -> digest

    # -------------------------------------------------------------------------- results
    @property
    def schedule(self) -> list[list[int]]:
        """`[[step, eof], ...]`: the starting cut at step 0, then each move after the check at `step`."""
        return self._inner.schedule

    def report(self) -> dict:
        """Settings, schedule, every check and decision, the probe's cost, and the audit."""
        return dict(self._inner.report(), audit=self.audit_report)

    # -------------------------------------------------------------------------- checkpoint state
    def state(self) -> dict:
        """What the Trainer writes into each checkpoint's trainer_state.json."""
        saved = dict(self._inner.state_dict(), probe=None)   # the probe's stored states are not saved
        return {"args": {}, "attributes": {"salf_state": {"dynamic": saved, "frozen_digests": self._digests}}}

    def _resume(self, saved: dict, model, optimizer) -> None:
        self._inner.load_state_dict(saved["dynamic"])   # checks the settings, re-applies the cut
        self._digests = saved.get("frozen_digests")
        drop_frozen_state(optimizer, model)

    # -------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if model is None:
            raise SalfError("salf.MovingCut needs the Trainer's model")
        _refuse_unsupported(args)
        self._planned(model)
        self._inner.attach(model)
        saved = _saved_state(state)
        if saved is not None:
            self._resume(saved, model, optimizer)
        check_in_optimizer(model, optimizer, "salf.MovingCut")
        drop_frozen_state(optimizer, model)
        if self._digests is None:
            self._digests = _frozen_digests(model)
        return self._inner.on_train_begin(args, state, control, model=model, optimizer=optimizer,
                                          lr_scheduler=lr_scheduler, **kwargs)

    def _planned(self, model) -> None:
        """The model's plan, applied here from `plan=` when it has none."""
        from .models.anatomy import anatomy, unwrap
        from .train import apply_plan
        from .train.freeze import assert_truncated, freeze_state

        fs = freeze_state(model)
        if fs is None and self.plan is None:
            raise SalfError("salf.MovingCut: the model has no cut: call salf.freeze(model, plan) before "
                            "training, or pass MovingCut(plan=...)")
        if fs is None:
            base = unwrap(model)
            plan = as_plan(self.plan, anatomy(base))
            if plan.head == "untied-copy" and anatomy(base).tied:
                raise SalfError("salf.MovingCut(plan=...): an untied head copy is a new parameter the optimizer "
                                "does not hold; call salf.freeze(model, plan) before building the Trainer")
            apply_plan(base, plan)
        assert_truncated(model)     # after the Trainer's own setup (checkpointing, PEFT)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        moves = len(self._inner.schedule)
        # optimizer=None: the groups stay as built (module doc); the state is dropped here
        result = self._inner.on_step_end(args, state, control, model=model, optimizer=None, **kwargs)
        if len(self._inner.schedule) > moves:
            freed = drop_frozen_state(optimizer, model)
            check_in_optimizer(model, optimizer, f"salf.MovingCut at step {state.global_step}")
            last = self._inner.decisions[-1] if self._inner.decisions else {}
            if isinstance(last.get("move"), dict):
                last["move"]["optimizer_state_bytes_freed"] = freed
        return result

    def on_train_end(self, args, state, control, model=None, **kwargs):
        result = self._inner.on_train_end(args, state, control, model=model, **kwargs)
        if model is not None:
            self.audit_report = dict(self._inner.audit(model), **_compare_digests(model, self._digests or {}))
            if self.audit_report["changed_since_start"]:
                raise SalfError("audit failed: tensors frozen from the start changed: "
                                + ", ".join(self.audit_report["changed_since_start"][:3]))
        return result


def _forwarding(event: str):
    def method(self, args, state, control, **kwargs):
        return getattr(self._inner, event)(args, state, control, **kwargs)

    method.__name__ = event
    method.__doc__ = f"Forwarded to the dynamic controller ({event})."
    return method


# every other Trainer event goes to the controller as it is (on_pre_optimizer_step, on_log, ...)
for _event in [name for name in vars(TrainerCallback) if name.startswith("on_")]:
    if _event not in vars(MovingCut):
        setattr(MovingCut, _event, _forwarding(_event))


def _refuse_unsupported(args) -> None:
    """A moving cut runs in one process or under DDP with unused-parameter search."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise SalfError("salf.MovingCut runs in one process or under DDP: under FSDP or DeepSpeed the optimizer "
                        "shards are built for one trainable set; use a static plan (salf.freeze) there")
    distributed.refuse_sharded_dynamic()
    if getattr(args, "world_size", 1) > 1 and getattr(args, "ddp_find_unused_parameters", None) is not True:
        raise SalfError("salf.MovingCut under DDP needs TrainingArguments(ddp_find_unused_parameters=True): "
                        "the layers a move freezes stay in DDP's buckets")
    if getattr(args, "restore_callback_states_from_checkpoint", False):
        raise SalfError("salf.MovingCut restores its own state from the checkpoint; leave "
                        "restore_callback_states_from_checkpoint=False (it would replace the callback and its probe)")


def _saved_state(state) -> dict | None:
    """Our state from a resumed checkpoint's trainer_state.json (None on a fresh run)."""
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(MovingCut.__name__)
    if isinstance(saved, list):
        raise SalfError("salf.MovingCut: one moving cut per Trainer")
    saved = ((saved or {}).get("attributes") or {}).get("salf_state")
    if not saved or not saved["dynamic"].get("schedule") or int(getattr(state, "global_step", 0)) == 0:
        return None
    return saved


def _frozen_digests(model) -> dict[str, str]:
    from .train.audit import tensor_digest

    return {n: tensor_digest(p) for n, p in model.named_parameters() if not p.requires_grad}


def _compare_digests(model, digests: dict[str, str]) -> dict:
    from .train.audit import tensor_digest

    params = dict(model.named_parameters())
    changed = [n for n, d in digests.items() if n in params and tensor_digest(params[n]) != d]
    return {"frozen_from_start": len(digests), "changed_since_start": changed}
