"""The cost of a cut on N data-parallel ranks: per-rank memory and gradient communication.

This extends `salf.cost` (one device) to N ranks under one of four engines. Each cut's
`cost_curve` entry gives the trainable/total parameter counts and the per-rank
activations (each rank runs its own micro-batch of `batch_size` x `seq_len` tokens); this
module shards parameters, gradients and optimizer states the way each engine does and
counts the bytes its collectives move. The formulas, and what torch measured of them,
are in docs/multi-gpu.md; the short version, with P = all parameters, T = trainable
parameters, p/g = bytes per parameter/gradient element, o = optimizer bytes per
trainable parameter (master copy + states):

| engine | params | grads | optimizer | collectives per step (payload) |
|---|---|---|---|---|
| ddp   | P·p   | T·g   | T·o   | all-reduce T·g |
| zero2 | P·p   | T·g/N | T·o/N | reduce-scatter T·g, all-gather T·p |
| fsdp, zero3 | P·p/N | T·g/N | T·o/N | all-gather (P + backward units)·p, reduce-scatter T·g |

Frozen parameters get no gradient, no optimizer state and no reduction in any engine.
Under FSDP/ZeRO-3 they are still all-gathered for the forward; the backward all-gathers
only the layers it goes through, plus the one frozen layer just below them that FSDP2's
implicit backward prefetch fetches for nothing (measured, tests/test_cluster.py).
Each rank sends (and receives) 2·(N−1)/N of an all-reduce's payload and (N−1)/N of an
all-gather's or reduce-scatter's (ring algorithms): `comm_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import SalfError

if TYPE_CHECKING:
    from .cost import ModelShape

# Import-light: the CLI's parser and checks read ENGINES, so salf.cost loads only when costing.
ENGINES = ("ddp", "fsdp", "zero2", "zero3")
DEFAULT_ENGINE = "ddp"
#: Engines that shard the parameters themselves (one FSDP unit per decoder layer).
_PARAMS_SHARDED = ("fsdp", "zero3")
#: Engines that shard gradients and optimizer states of the trainable parameters.
_STATE_SHARDED = ("zero2", "fsdp", "zero3")
_GiB, _GB = 2**30, 1e9


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of training state."""

    name: str
    param_bytes: int    # every parameter as the model holds it; what all-gathers move
    grad_bytes: int     # the gradient of a trainable parameter; what reductions move
    master_bytes: int   # the optimizer's master copy of a trainable parameter (0: none)
    state_bytes: int    # each optimizer state (AdamW keeps 2 per trainable parameter)


#: bf16 weights and gradients, fp32 master weights and fp32 Adam states: DeepSpeed's bf16
#: training (16 bytes per trainable parameter with AdamW, 2 per frozen one).
BF16_MIXED = Precision("bf16-mixed", 2, 2, 4, 4)


def uniform_precision(dtype_bytes: int) -> Precision:
    """Every state in the model's dtype, no master copy: salf.cost's one-device assumption."""
    name = {2: "bf16", 4: "fp32"}.get(dtype_bytes, f"{dtype_bytes}-byte")
    return Precision(name, dtype_bytes, dtype_bytes, 0, dtype_bytes)


def precision_for(dtype_bytes: int, precision: Precision | str | None = None) -> Precision:
    """`precision` itself, or by name: "uniform" (the default: every state in the model's
    dtype, what salf train's AdamW does on a model loaded in that dtype, so one rank costs
    what salf.cost says) or "bf16-mixed" (DeepSpeed's bf16 accounting)."""
    if isinstance(precision, Precision):
        return precision
    if precision in (None, "uniform"):
        return uniform_precision(dtype_bytes)
    if precision == "bf16-mixed":
        return BF16_MIXED
    raise SalfError(f"cluster cost model: unknown precision {precision!r}; choose uniform or bf16-mixed")


def check_cluster(ranks, engine) -> None:
    """One-line SalfError unless ranks is a positive integer and engine one of ENGINES."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise SalfError(f"cluster cost model: ranks must be a positive integer, got {ranks!r}")
    if engine not in ENGINES:
        raise SalfError(f"cluster cost model: unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


# ---------------------------------------------------------------------------------------
# One cut on N ranks

def _head_trains(entry: dict) -> bool:
    return entry["full"] or entry["head"] != "frozen"


def _trained_layers(shape: ModelShape, entry: dict) -> range:
    """The decoder layers a cut trains, which are also those its backward goes through."""
    return range(entry["eof"], shape.num_layers)


def _largest_trainable_unit(shape: ModelShape, entry: dict) -> int:
    """Trainable parameters of the largest unit (a decoder layer, or the root: embeddings,
    final norm, head): the gradients a sharded engine holds unsharded before reducing them."""
    layers = [shape.layer_params[i] for i in _trained_layers(shape, entry)]
    root = entry["trainable_params"] - sum(layers)
    return max(layers + [root])


def _buffers(shape: ModelShape, entry: dict, ranks: int, engine: str, prec: Precision) -> float:
    """Engine buffers beyond the sharded state, counted as live for the whole step."""
    T = entry["trainable_params"]
    if engine == "ddp":
        # the reducer's buckets copy every gradient (gradient_as_bucket_view=False, the
        # default); one process is not wrapped in DDP at all
        return T * prec.grad_bytes if ranks > 1 else 0.0
    unreduced = _largest_trainable_unit(shape, entry) * prec.grad_bytes
    if engine == "zero2":
        return unreduced
    # fsdp/zero3: the root unit stays gathered from forward to backward (FSDP2 does not
    # reshard the root), plus the current and the prefetched layer unit
    root = entry["total_params"] - sum(shape.layer_params)
    return (root + 2 * max(shape.layer_params)) * prec.param_bytes + unreduced


def _memory(shape: ModelShape, entry: dict, ranks: int, engine: str, prec: Precision,
            n_states: int) -> tuple[dict, float, str]:
    """(per-rank breakdown, peak bytes, the phase of the peak), as salf.cost's §3 peak:
    the larger of the start of backward (activations, the head's gradient) and its end
    (every gradient)."""
    P, T = entry["total_params"], entry["trainable_params"]
    params_share = 1 / ranks if engine in _PARAMS_SHARDED else 1
    state_share = 1 / ranks if engine in _STATE_SHARDED else 1
    b = entry["memory_breakdown"]
    memory = {
        "params": P * prec.param_bytes * params_share,
        "grads": T * prec.grad_bytes * state_share,
        "optimizer": T * (prec.master_bytes + n_states * prec.state_bytes) * state_share,
        "activations": b["activations"] + b["logits"] + b["workspace"],
        "buffers": _buffers(shape, entry, ranks, engine, prec),
    }
    # DDP computes the head's full gradient first, while every activation is alive; the
    # sharded engines' unreduced gradients are already in their buffers
    head_grad = shape.unembedding_params * prec.grad_bytes if engine == "ddp" and _head_trains(entry) else 0
    static = memory["params"] + memory["optimizer"] + memory["buffers"]
    backward_start = static + memory["activations"] + head_grad
    after_backward = static + memory["grads"] + b["workspace"]
    phase = "backward-start" if backward_start >= after_backward else "after-backward"
    return memory, max(backward_start, after_backward), phase


def _gathered_in_backward(shape: ModelShape, entry: dict) -> int:
    """Parameters FSDP all-gathers again for the backward: the layers it goes through and,
    below a cut, the frozen layer FSDP2's implicit backward prefetch fetches anyway (the
    root unit was never resharded)."""
    return sum(shape.layer_params[max(entry["eof"] - 1, 0):])


def _collectives(shape: ModelShape, entry: dict, engine: str, prec: Precision) -> dict:
    """Payload bytes of each collective in one step (a full all-gather output, a full
    reduce-scatter input, an all-reduce buffer)."""
    grads = entry["trainable_params"] * prec.grad_bytes
    if engine == "ddp":
        return {"all_reduce": grads}
    if engine == "zero2":   # reduce-scatter the gradients, all-gather the updated parameters
        return {"reduce_scatter": grads, "all_gather": entry["trainable_params"] * prec.param_bytes}
    gathered = entry["total_params"] + _gathered_in_backward(shape, entry)
    return {"all_gather": gathered * prec.param_bytes, "reduce_scatter": grads}


def _on_the_wire(collectives: dict, ranks: int) -> dict:
    """Bytes each rank sends per collective under ring algorithms."""
    share = (ranks - 1) / ranks
    factor = {"all_reduce": 2 * share, "all_gather": share, "reduce_scatter": share}
    return {name: payload * factor[name] for name, payload in collectives.items()}


def _rank_cost(shape: ModelShape, entry: dict, ranks: int, engine: str, prec: Precision,
               n_states: int) -> dict:
    memory, peak, phase = _memory(shape, entry, ranks, engine, prec, n_states)
    collectives = _collectives(shape, entry, engine, prec)
    wire = _on_the_wire(collectives, ranks)
    keys = ("cut", "eof", "full", "valid", "trainable_params", "total_params")
    return dict({k: entry[k] for k in keys}, ranks=ranks, engine=engine, precision=prec.name,
                memory=memory, memory_bytes=float(peak), memory_peak_phase=phase,
                collectives={k: float(v) for k, v in collectives.items()},
                comm={k: float(v) for k, v in wire.items()}, comm_bytes=float(sum(wire.values())))


# ---------------------------------------------------------------------------------------
# Public API

def cluster_curve(shape: ModelShape, seq_len: int, batch_size: int, ranks: int,
                  engine: str = DEFAULT_ENGINE, *, precision: Precision | str | None = None,
                  **settings) -> list[dict]:
    """Per-rank memory and communication of every cut k = 0..L (list index = k) and of
    full fine-tuning (the last entry) on `ranks` data-parallel ranks under `engine`.

    `batch_size` x `seq_len` is one rank's micro-batch; `settings` are cost_curve's
    (loss_positions, optimizer, dtype_bytes, head, gradient_checkpointing, attention,
    machine); LoRA is not modelled. `precision`: see `precision_for`. Each entry:
    `memory` {params, grads, optimizer, activations, buffers} and `memory_bytes` (the
    peak) per rank, `collectives` (payload bytes), `comm` and `comm_bytes` (bytes each
    rank sends in one optimizer step).
    """
    from .cost import OPTIMIZER_STATES, StepSettings, cost_curve

    check_cluster(ranks, engine)
    if settings.get("lora_rank") is not None:
        raise SalfError("cluster cost model: LoRA is not modelled; cost the cut without lora_rank")
    prec = precision_for(settings.get("dtype_bytes", 4), precision)
    entries = cost_curve(shape, StepSettings(seq_len, batch_size, **settings), include_full=True)
    n_states = OPTIMIZER_STATES[settings.get("optimizer", "adamw")]   # checked by StepSettings
    return [_rank_cost(shape, e, ranks, engine, prec, n_states) for e in entries]


def cluster_curve_from_table(cost: dict, ranks: int, engine: str = DEFAULT_ENGINE) -> list[dict]:
    """`cluster_curve` for the shape and settings of a saved cost table (trace.json's
    extra.cost, `cost_table`'s output)."""
    from .cost import ModelShape

    settings = dict(cost.get("settings") or {})
    try:
        shape = ModelShape.from_dict(cost.get("shape"))
        seq_len, batch_size = settings.pop("seq_len"), settings.pop("batch_size")
    except KeyError as e:
        raise SalfError(f"cost table: settings have no {e.args[0]}; rerun `salf analyze`") from None
    return cluster_curve(shape, seq_len, batch_size, ranks, engine, **settings)


def table_cuts(num_layers: int, extra=()) -> list[int]:
    """The cuts a cluster table shows: 0, L/2, 3L/4 and any `extra` (e.g. the plan's)."""
    return sorted({0, num_layers // 2, 3 * num_layers // 4, *extra})


MARKDOWN_COLUMNS = ("cut", "trainable", "params GiB", "grads GiB", "optimizer GiB", "activations GiB",
                    "buffers GiB", "peak GiB", "all-gather GB", "reduce-scatter GB", "all-reduce GB",
                    "sent GB/step")


def markdown_header(lead_column: str | None = None) -> list[str]:
    """The two header lines of a `markdown_rows` table, after an optional leading column."""
    columns = ((lead_column,) if lead_column else ()) + MARKDOWN_COLUMNS
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else (f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}")


def _amount(x: float, unit: float) -> str:
    """x in `unit`s: two decimals, or two significant digits below 0.01 (tiny models)."""
    v = x / unit
    return f"{v:.2f}" if v == 0 or v >= 0.01 else f"{v:.2g}"


def markdown_rows(curve: list[dict], cuts, mark: int | None = None, lead: str | None = None) -> list[str]:
    """Markdown rows of `cuts` and full fine-tuning of one cluster_curve (columns:
    MARKDOWN_COLUMNS, after `lead` when given); the cut `mark` is flagged "(plan)"."""
    rows = []
    for entry in [curve[k] for k in cuts] + [curve[-1]]:
        m, c = entry["memory"], entry["comm"]
        cut = "full" if entry["full"] else f"{entry['eof']}" + (" (plan)" if entry["eof"] == mark else "")
        cells = ([lead] if lead else []) + [
            cut, _count(entry["trainable_params"]),
            *(_amount(m[k], _GiB) for k in ("params", "grads", "optimizer", "activations", "buffers")),
            f"**{_amount(entry['memory_bytes'], _GiB)}**",
            *(_amount(c[k], _GB) if k in c else "–" for k in ("all_gather", "reduce_scatter", "all_reduce")),
            f"**{_amount(entry['comm_bytes'], _GB)}**"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def cluster_report(cost: dict, plan_eof: int, ranks: int, engine: str = DEFAULT_ENGINE) -> str:
    """What `salf plan --ranks N --engine E` prints: the settings line and a Markdown
    table of the plan's cut, 0, L/2, 3L/4 and full fine-tuning."""
    curve = cluster_curve_from_table(cost, ranks, engine)
    s = cost["settings"]
    num_layers = len(curve) - 2
    title = (f"per rank on {ranks} x {engine} ({curve[0]['precision']}; micro-batch {s['batch_size']} x "
             f"{s['seq_len']} tokens; model output, docs/multi-gpu.md):")
    lines = [title, *markdown_header(),
             *markdown_rows(curve, table_cuts(num_layers, [plan_eof]), mark=plan_eof)]
    return "\n".join(lines)
