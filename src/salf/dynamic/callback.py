"""`DynamicFreezeCallback`: checks the run at intervals and moves the cut deeper when its
policy says so (docs/method.md, "Dynamic freezing"; docs/training.md, "Dynamic freezing").

Works in `salf train --dynamic` and in anyone's own `Trainer`:

    model = apply_plan(model, plan)                          # the starting cut
    probe = Probe(make_batches(task, tok, probe_rows, 8, 96), "classification", label_ids)
    trainer = Trainer(model=model, ..., callbacks=[DynamicFreezeCallback(DynamicSettings(), probe)])

At each check step it measures what the policy needs (`salf.dynamic.policies.NEEDS`: the
probe's deviation per space and task loss, or the gradient norms accumulated since the last
check), asks the policy for the cut, and moves it with `salf.train.freeze.move_cut` (which
drops the newly frozen parameters from the optimizer). It hashes every newly frozen tensor
when it freezes, so the audit can prove it never changed again, and it records the schedule
`[[step, eof], ...]`. Its whole state is JSON (`state_dict` / `load_state_dict`): a
checkpoint carries it, and `restore_cut` re-applies the cut to a fresh model before the
Trainer builds its optimizer, so a resumed run continues the same schedule.

Under DDP every rank measures its own replica and takes rank 0's decision; the Trainer must
let DDP find unused parameters (`ddp_find_unused_parameters=True`, which `salf train` sets
for a dynamic run), since the layers a move freezes stay in the buckets built at the wrap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import distributed
from ..errors import SalfError
from ..io import atomic_write_json
from ..models.anatomy import anatomy, unwrap
from ..train.audit import tensor_digest
from ..train.freeze import freeze_state, move_cut, move_cut_back, optimizer_state_bytes
from .allocation import DRIFT_LAG, Drift, allocation
from .budget import probe_wanted
from .policies import Check, Decision, RunShape, decide
from .settings import DynamicSettings

LOG_FILE = "dynamic.json"          # in the run folder: settings, checks, decisions, schedule


def check_steps(total_steps: int, checks: int) -> list[int]:
    """Evenly spaced check steps strictly inside the run (a check at the last step could
    change nothing): every max(1, T // checks) steps."""
    every = max(1, total_steps // checks)
    return list(range(every, total_steps, every))


def _lr_multipliers(lr_scheduler, total_steps: int) -> list[float] | None:
    """λ(s) of a LambdaLR schedule (every transformers schedule is one) for steps 0..T-1."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)   # accelerate wraps it
    lambdas = getattr(inner, "lr_lambdas", None)
    if not lambdas:
        return None
    return [float(lambdas[0](s)) for s in range(total_steps)]


@dataclass
class ControllerRecord:
    """What the controller has seen and done: everything a checkpoint carries besides the
    settings and the probe's stored read, round-tripped as JSON in one place."""

    history: list[Check] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    schedule: list[list[int]] = field(default_factory=list)    # [[step, eof], ...]
    frozen_at: dict[str, dict] = field(default_factory=dict)   # tensor -> {"step", "digest", "group"}
    intervals: dict[str, list] = field(default_factory=dict)   # tensor -> [[frozen, unfrozen], ...]
    train_losses: list[list[float]] = field(default_factory=list)   # [step, clock, loss] per logged step
    probe_reads: int = 0
    probe_seconds: float = 0.0
    probe_targets: int = 0
    grad_sums: list[float] | None = None           # per layer, since the last check
    allocation_sums: list[float] | None = None     # per layer + the rest, since the last check
    allocation_steps: int = 0
    drift_steps: list[int] = field(default_factory=list)   # the drift's snapshot steps (its tensors: tensor state)
    last_cosines: list[list[float]] | None = None  # the last probe read's, per space

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), history=[c.to_dict() for c in self.history])

    @classmethod
    def from_dict(cls, state: dict) -> "ControllerRecord":
        """A checkpoint's record; keys a later salf added default (older checkpoints)."""
        names = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in state.items() if k in names and v is not None})
        record.history = [Check(**c) for c in record.history]
        return record


class DynamicFreezeCallback(TrainerCallback):
    salf_key = "dynamic"     # its section of run.json, metrics.json and each checkpoint's state
    moves_cut = True         # freezes layers after DDP built its buckets (training_arguments)

    def __init__(self, settings: DynamicSettings | None = None, probe=None, *,
                 out_dir: str | Path | None = None, prefix_cache=None, log=None):
        self.settings = settings or DynamicSettings()
        if "probe" in self.settings.needs and probe is None:
            raise SalfError(f"dynamic policy {self.settings.policy!r} reads a probe set: pass probe=Probe(...)")
        self.probe = probe
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.prefix_cache = prefix_cache
        self.log = log or _write_line
        self.record = ControllerRecord()
        self._wrap_eof: int | None = None        # the cut when this process's training began
        self._read_share = 0.0                   # one probe read's FLOPs / the run's (full)
        self._probe_state: dict | None = None                 # a checkpoint's, until its tensors come
        self._drift: Drift | None = None                      # --ahead-from drift: the snapshots
        self._drift_tensors: dict = {}                        # a checkpoint's, until training begins
        self._steps: list[int] = []
        self._run: RunShape | None = None
        self.model = None          # set by attach(): what a resumed state re-cuts
        self.cost_settings: dict | None = None
        self.final_audit: dict | None = None

    # what other code reads (salf.api.MovingCut, the tests)
    history = property(lambda self: self.record.history)
    decisions = property(lambda self: self.record.decisions)
    schedule = property(lambda self: self.record.schedule)
    frozen_at = property(lambda self: self.record.frozen_at)
    probe_reads = property(lambda self: self.record.probe_reads)

    def attach(self, model, prefix_cache=None, cost_settings: dict | None = None) -> None:
        """The planned model (and its prefix cache) this callback moves; `cost_settings`
        (shape, seq_len, batch_size, loss_positions, head, lora_rank, gradient_checkpointing)
        let metrics_section() integrate the schedule's cost."""
        self.model, self.prefix_cache, self.cost_settings = model, prefix_cache, cost_settings

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        if self._drift is not None:      # the snapshot steps, read when saved (not every step)
            self.record.drift_steps = self._drift.state_dict()["steps"]
        return {"settings": self.settings.to_dict(), **self.record.to_dict(),
                "probe": self.probe.state_dict() if self.probe is not None else None}

    def tensor_state_dict(self) -> dict:
        """The probe's stored boundary states and the drift's snapshots: a resumed run's next
        read starts where the uninterrupted run's would (the same cost, the same numbers)."""
        tensors = self.probe.tensor_state_dict() if self.probe is not None else {}
        if self._drift is not None:
            tensors.update({f"drift.{k}": t for k, t in self._drift.tensor_state_dict().items()})
        return tensors

    def load_tensor_state_dict(self, tensors: dict) -> None:
        if self.probe is not None and self._probe_state:
            self.probe.load_state_dict(self._probe_state, tensors)     # reads its own keys only
        self._drift_tensors = {k[len("drift."):]: t for k, t in tensors.items() if k.startswith("drift.")}

    def load_state_dict(self, state: dict) -> None:
        saved = DynamicSettings.from_dict(state["settings"])
        if saved != self.settings:
            raise SalfError("--resume: the checkpoint's dynamic settings differ from this run's "
                            f"({saved.to_dict()} vs {self.settings.to_dict()})")
        self.record = ControllerRecord.from_dict(state)
        self._probe_state = state.get("probe")     # its tensors follow: load_tensor_state_dict
        if self.model is not None:
            self.restore_cut(self.model)

    def restore_cut(self, model) -> None:
        """Re-apply the schedule's last cut to a freshly planned model (before its optimizer
        exists, so the optimizer is built over exactly the parameters that still train)."""
        if self.record.schedule and self.record.schedule[-1][1] > freeze_state(model).eof:
            move_cut(model, int(self.record.schedule[-1][1]))
            if self.prefix_cache is not None:
                self.prefix_cache.move_to(int(self.record.schedule[-1][1]))

    @property
    def current_eof(self) -> int:
        return int(self.record.schedule[-1][1])

    def run_settings(self) -> dict:
        """What a resumed run must share (run.json): the settings and the probe set."""
        return {"settings": self.settings.to_dict(), "probe_rows": getattr(self.probe, "rows", None),
                "probe_tokens": getattr(self.probe, "tokens", None)}

    def recorded_settings(self, recorded: dict) -> dict:
        """An older run.json's record as it reads today: settings added since (salf-budget's,
        for a run of the first controller written before they existed) take their defaults."""
        settings = recorded.get("settings")
        if not isinstance(settings, dict):
            return recorded
        try:
            return dict(recorded, settings=DynamicSettings.from_dict(settings).to_dict())
        except SalfError:
            return recorded            # unreadable: compared as written, the diff names it

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        total = int(state.max_steps)
        fs = freeze_state(model)
        if fs is None:
            raise SalfError("DynamicFreezeCallback needs a model with a plan applied "
                            "(salf.train.apply_plan) before the Trainer is built")
        L = anatomy(unwrap(model)).num_layers
        max_eof = self.settings.deepest_cut(L, int(self.record.schedule[0][1]) if self.record.schedule else fs.eof)
        multipliers = (_lr_multipliers(lr_scheduler, total)
                       if self.settings.clock == "lr-area" else None) or [1.0] * total
        # the policy reads the record's losses as they are appended (no copy per step)
        self._run = RunShape(num_layers=L, total_steps=total, total_progress=sum(multipliers),
                             max_eof=max_eof, multipliers=multipliers,
                             cut_cost=self._cut_costs(L), train_losses=self.record.train_losses)
        per_run = self.settings.law_checks if "train_loss" in self.settings.needs else self.settings.checks
        self._steps = check_steps(total, per_run)
        self._read_share = self._probe_read_share(args, total)
        if "drift" in self.settings.needs:
            self._drift = Drift(period=max(1, round(DRIFT_LAG * total)))
            self._drift.load_state_dict({"steps": self.record.drift_steps}, self._drift_tensors)
            self._drift_tensors = {}
        if not self.record.schedule:
            self.record.schedule = [[0, fs.eof]]
        self._wrap_eof = self.current_eof
        if not self.record.history and "probe" in self.settings.needs:
            self.record.history.append(self._measure(model, 0))
            self._write_log()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "train_loss" in self.settings.needs and logs and "loss" in logs and self._run is not None:
            step = int(state.global_step)
            if not self.record.train_losses or self.record.train_losses[-1][0] < step:
                self.record.train_losses.append([step, self._run.clock(step), float(logs["loss"])])

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or not self.settings.needs & {"update_shares", "drift", "grad_norms"}:
            return                         # every step: nothing to do for the other policies
        layers = anatomy(unwrap(model)).layers
        measured = None
        if "update_shares" in self.settings.needs and optimizer is not None:
            measured = allocation(layers, optimizer)
        elif self._drift is not None:
            measured = self._drift.observe(int(state.global_step), layers, self._run.clock)
        if measured is not None:           # a step with no direction yet is not evidence
            sums = self.record.allocation_sums or [0.0] * len(measured)
            self.record.allocation_sums = [a + b for a, b in zip(sums, measured)]
            self.record.allocation_steps += 1
        if "grad_norms" not in self.settings.needs:
            return
        sums = self.record.grad_sums or [0.0] * len(layers)
        for i, layer in enumerate(layers):
            sums[i] += float(sum(p.grad.detach().abs().sum() for p in layer.parameters()
                                 if p.grad is not None))
        self.record.grad_sums = sums

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = int(state.global_step)
        if step not in self._steps or any(c.step == step for c in self.record.history):
            return
        check = self._measure(model, step)
        self.record.history.append(check)
        # under DDP every rank probes its replica; rank 0's decision moves every rank's cut
        decision = distributed.from_main(decide(self.settings, self.record.history, self._run))
        if decision.eof > check.eof:
            check.given_up, check.share = decision.details.get("given_up"), decision.details.get("share")
        if decision.eof < check.eof and distributed.world_size() > 1 and decision.eof < self._wrap_eof:
            # DDP's buckets hold only what trained at the wrap: nothing below it can rejoin
            decision = Decision(check.eof, f"hold: {decision.reason} — not below eof {self._wrap_eof}, "
                                           "the cut when DDP wrapped the model", decision.details)
        moved = None
        if decision.eof > check.eof:
            moved = self._move(model, optimizer, step, decision)
        elif decision.eof < check.eof:
            moved = self._move_back(model, optimizer, step, decision)
        self.record.decisions.append({"step": step, "from": check.eof, "to": decision.eof,
                               "reason": decision.reason, "details": decision.details, "move": moved})
        # a policy that checks often (salf-budget: every few steps) prints what it read or did
        quiet = ("train_loss" in self.settings.needs and check.deviation is None
                 and decision.eof == check.eof)
        if distributed.is_main() and not quiet:
            self.log(self._summary_line(check, decision))
        self._write_log()

    # ------------------------------------------------------------------ measuring and moving
    def _measure(self, model, step: int) -> Check:
        check = Check(step=step, eof=self.current_eof if self.record.schedule else freeze_state(model).eof,
                      progress=self._run.clock(step))
        if "probe" in self.settings.needs and self._probe_now(check):
            read = self.probe.read(model, cut=check.eof)
            check.deviation, check.loss = read["deviation"], read["loss"]
            check.probe_from_layer = read["from_layer"]
            if self.record.last_cosines is not None:
                check.shift = [sum(abs(a - b) for a, b in zip(now, before)) / max(len(now), 1)
                               for now, before in zip(read["cosines"], self.record.last_cosines)]
            self.record.last_cosines = read["cosines"]
            self.record.probe_reads += 1
            self.record.probe_seconds += read["seconds"]
            self.record.probe_targets = read["targets"]
        if "grad_norms" in self.settings.needs:
            check.grad_norms, self.record.grad_sums = self.record.grad_sums, None
        if self.settings.needs & {"update_shares", "drift"} and step > 0:
            check.allocation, check.allocation_steps = (self.record.allocation_sums,
                                                        self.record.allocation_steps)
            self.record.allocation_sums, self.record.allocation_steps = None, 0
        return check

    def _probe_now(self, check: Check) -> bool:
        """Every check reads the probe, except for a policy that reads it on demand: then at
        step 0 (the baseline) and where the policy wants it, within the probe budget."""
        if "probe_on_demand" not in self.settings.needs or check.step == 0:
            return True
        affordable = (self.record.probe_reads + 1) * self._read_share <= self.settings.probe_budget
        return affordable and probe_wanted(self.settings, [*self.record.history, check], self._run)

    def _cut_costs(self, num_layers: int) -> list[float]:
        """Per-step cost at each cut 0..L relative to full fine-tuning: the cost model's when
        salf's trainer attached its settings, else the share of layers whose backward runs
        (a frozen layer skips its backward: ~2/3 of its FLOPs)."""
        if self.cost_settings is None:
            return [1.0 - (2.0 / 3.0) * k / num_layers for k in range(num_layers + 1)]
        from ..cost import StepSettings, cost_curve

        c = dict(self.cost_settings)
        curve = cost_curve(c.pop("shape"), StepSettings(**c), include_full=True)
        return [curve[k]["flops_abs"] / curve[-1]["flops_abs"] for k in range(num_layers + 1)]

    def _probe_read_share(self, args, total_steps: int) -> float:
        """One probe read (every layer) as a share of the run's full fine-tuning FLOPs: a
        forward over the probe's rows against forward + backward over each step's rows."""
        if self.probe is None:
            return 0.0
        rows_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                         * max(distributed.world_size(), 1))
        return self.probe.rows / (3.0 * rows_per_step * max(total_steps, 1))

    def _move(self, model, optimizer, step: int, decision: Decision) -> dict:
        before = _memory(optimizer)
        report = move_cut(model, decision.eof, optimizer=optimizer)
        params = dict(model.named_parameters())
        for name in report["tensors"]:
            self.record.frozen_at[name] = {"step": step, "digest": tensor_digest(params[name]),
                                    "group": report["groups"].get(name)}
        if self.prefix_cache is not None:
            self.prefix_cache.move_to(decision.eof)
        self.record.schedule.append([step, decision.eof])
        after = _memory(optimizer)
        return {"tensors": len(report["tensors"]), "params": report["params"],
                "optimizer_state_bytes_freed": report["optimizer_state_bytes_freed"],
                "memory_before": before, "memory_after": after}

    def _move_back(self, model, optimizer, step: int, decision: Decision) -> dict:
        """Undo: the tensors frozen at or above the new cut train again. Each is checked
        unchanged over its frozen interval first (the audit's proof for that interval)."""
        params = dict(model.named_parameters())
        above = {id(p) for layer in anatomy(unwrap(model)).layers[decision.eof:] for p in layer.parameters()}
        layers = {n for n in self.record.frozen_at if id(params[n]) in above}
        changed = [n for n in layers if tensor_digest(params[n]) != self.record.frozen_at[n]["digest"]]
        if changed:
            raise SalfError("audit failed: tensors frozen during the run changed while frozen: "
                            + ", ".join(sorted(changed)[:3]))
        report = move_cut_back(model, decision.eof, {n: self.record.frozen_at[n]["group"] for n in layers},
                               optimizer=optimizer if optimizer is not None else None)
        for n in layers:
            self.record.intervals.setdefault(n, []).append([self.record.frozen_at.pop(n)["step"], step])
        if self.prefix_cache is not None:
            self.prefix_cache.move_to(decision.eof)
        self.record.schedule.append([step, decision.eof])
        return {"tensors": len(report["tensors"]), "params": report["params"], "undo": True}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        self.final_audit = self.audit(model)
        if not self.final_audit["ok"]:
            raise SalfError("audit failed: tensors frozen during the run changed afterwards: "
                            + ", ".join(self.final_audit["changed"][:3]))

    def audit(self, model) -> dict:
        """Every tensor frozen during the run is bit-identical to what it was when it froze."""
        params = dict(model.named_parameters())
        changed = [n for n, rec in self.record.frozen_at.items() if tensor_digest(params[n]) != rec["digest"]]
        return {"ok": not changed, "frozen_during_run": len(self.record.frozen_at), "changed": changed,
                "frozen_at": {n: rec["step"] for n, rec in self.record.frozen_at.items()},
                "undone_intervals": self.record.intervals}

    # ------------------------------------------------------------------ reporting
    def metrics_section(self) -> dict:
        """metrics.json["dynamic"]: the schedule, every check and decision, the probe's cost,
        the audit of the tensors frozen during the run, and the integrated cost."""
        section = self.report()
        section["audit"] = self.final_audit
        if self.cost_settings is not None and self._run is not None:
            section["cost"] = self.integrated_cost()
        return section

    def integrated_cost(self) -> dict:
        """schedule_cost over the run, the probes' forward passes included."""
        from ..cost import StepSettings, forward_flops
        from .cost import schedule_cost

        c = dict(self.cost_settings)
        shape = c.pop("shape")
        probe_flops = 0.0
        if self.record.probe_reads:
            per_row = max(1, round(self.record.probe_targets / self.probe.rows))
            probe_flops = sum(forward_flops(shape, c["seq_len"], self.probe.rows, head_positions=per_row,
                                            from_layer=check.probe_from_layer or 0)
                              for check in self.record.history if check.deviation is not None)
        return schedule_cost(shape, self.record.schedule, self._run.total_steps, StepSettings(**c),
                             probe_flops=probe_flops)

    def report(self) -> dict:
        return {"settings": self.settings.to_dict(), "schedule": self.record.schedule,
                "checks": [c.to_dict() for c in self.record.history], "decisions": self.record.decisions,
                "probe": {"reads": self.record.probe_reads, "seconds": self.record.probe_seconds,
                          "rows": getattr(self.probe, "rows", None),
                          "tokens": getattr(self.probe, "tokens", None),
                          "targets": self.record.probe_targets}}

    def _write_log(self) -> None:
        if self.out_dir is not None and distributed.is_main():
            atomic_write_json(self.out_dir / LOG_FILE, self.report())

    def _summary_line(self, check: Check, decision: Decision) -> str:
        loss = "" if check.loss is None else f"probe loss {check.loss:.4f}, "
        move = (f"cut {check.eof} -> {decision.eof}" if decision.eof != check.eof
                else f"cut stays {check.eof}")
        return f"step {check.step}: {loss}{move} ({decision.reason})"


def _memory(optimizer) -> dict:
    out = {"optimizer_state_bytes": optimizer_state_bytes(optimizer) if optimizer is not None else 0}
    if torch.cuda.is_available():
        out["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated())
    try:
        import psutil

        out["rss_bytes"] = int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        pass
    return out


def _write_line(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"salf: {text}")
