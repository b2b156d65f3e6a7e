"""Transition trace (docs/method.md, formula map §1, §3, §4): streaming per-space statistics.

One forward per batch under `torch.inference_mode`, with hooks on the decoder
layers: a forward-pre-hook on `layers[0]` captures space 0 (the input of
decoder layer 1), a forward hook on `layers[i]` captures space i+1. Each hook
immediately gathers only the target positions of its hidden states — an
(n_targets, d) copy — and the forward stops after the last layer
(`salf.models.replay.run_to_layer`), so neither the final norm over all
positions nor the (B, T, V) logits are ever computed. Full hidden states are
never retained and `output_hidden_states` is not used.

After the forward, every captured slice goes through the final transform N
once (`anat.normalize`), its statistics are added to running sums, and the
slices are dropped: memory is O(B · targets · d · (L+1)) per batch,
independent of sequence length, and nothing per space survives a batch
except sums and (for classification) the per-target label cosines the AUC
needs — (n_examples x n_labels) floats per space.

Statistics per space l (t = N(h^l), b_v the semantic basis, cos = cosine):
- deviation  D_l = mean(1 - cos(t, b_y))             (all tasks)
- label_ce   mean CE of softmax_k(cos(t, b_k) / TAU) vs the true label  (classification)
- lens_acc   mean [argmax_k cos(t, b_k) == label]  (classification)
- margin_auc binary: AUC of cos(t, b_1) - cos(t, b_0) for label 1 vs 0;
             K > 2: mean over labels k of the one-vs-rest AUC of cos(t, b_k)
- logit_lens_ce   mean full-vocabulary CE of logits_from_normed(t) vs y (if logit_lens)
- logit_lens_acc  argmax of those logits restricted to the label ids == label
                  (classification, if logit_lens)
  logit_lens="last" computes both at the output space L only: the model's own loss at the
  targets (what a dynamic-freezing probe reads), at the cost of one head call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..config import TAU  # noqa: F401  (the label softmax's temperature; salf.analysis.TAU)
from ..config import TraceConfig
from ..errors import SalfError
from ..io import atomic_write_text, read_json
from ..models.anatomy import layer_output
from ..models.config import config_value, text_config
from ..models.replay import run_to_layer
from .basis import semantic_basis, weight_fingerprint

SPACE_KEYS = ("space", "deviation", "deviation_se", "label_ce", "lens_acc", "margin_auc",
              "logit_lens_ce", "logit_lens_acc", "n_targets")

_LOGIT_CHUNK = 512   # target rows per logit-lens head call


# --------------------------------------------------------------------------- Trace


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.generic,)):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return repr(obj)


# --------------------------------------------------------------------------- reading trace.json
TASKS = ("classification", "sft")


def _field_error(source: str, name: str, expected: str, value) -> SalfError:
    shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
    return SalfError(f"{source}: {name} must be {expected}, got {shown}")


def _is_finite_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _checked_spaces(spaces, num_layers: int, source: str) -> list[dict]:
    """A trace dict's spaces, each with every SPACE_KEYS entry; a wrong type is one SalfError."""
    if not isinstance(spaces, list):
        raise _field_error(source, "spaces", f"a list of {num_layers + 1} objects", spaces)
    if len(spaces) != num_layers + 1:
        raise SalfError(f"{source}: spaces has {len(spaces)} entries, but num_layers "
                        f"{num_layers} needs {num_layers + 1} (embedding output + each layer)")
    checked = []
    for i, space in enumerate(spaces):
        if not isinstance(space, dict):
            raise _field_error(source, f"spaces[{i}]", "an object", space)
        space = {**dict.fromkeys(SPACE_KEYS), "space": i, **space}  # older traces lack keys
        if space["space"] != i:
            raise _field_error(source, f"spaces[{i}].space", str(i), space["space"])
        if not _is_finite_number(space["deviation"]):
            raise _field_error(source, f"spaces[{i}].deviation", "a finite number",
                               space["deviation"])
        for key in SPACE_KEYS[2:]:
            if space[key] is not None and not _is_finite_number(space[key]):
                raise _field_error(source, f"spaces[{i}].{key}", "a finite number or null",
                                   space[key])
        checked.append(space)
    return checked


@dataclass
class Trace:
    """Per-space statistics of one model on one analysis sample (see module doc)."""

    model: dict
    data: dict
    task: str
    num_layers: int
    spaces: list[dict]
    shapes: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    salf_version: str = __version__

    def __post_init__(self):
        if len(self.spaces) != self.num_layers + 1:
            raise SalfError(f"trace has {len(self.spaces)} spaces but num_layers={self.num_layers} "
                            f"(expected {self.num_layers + 1})")

    @property
    def deviations(self) -> list[float]:
        """D_0..D_L."""
        return [s["deviation"] for s in self.spaces]

    def metric(self, key: str) -> list:
        return [s.get(key) for s in self.spaces]

    def to_dict(self) -> dict:
        return _jsonable({
            "model": self.model, "data": self.data, "task": self.task,
            "num_layers": self.num_layers, "spaces": self.spaces, "shapes": self.shapes,
            "timing": self.timing, "settings": self.settings, "extra": self.extra,
            "salf_version": self.salf_version,
        })

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict, source: str = "trace") -> "Trace":
        """A Trace from its JSON form; a missing or mistyped field is one SalfError naming it."""
        if not isinstance(d, dict):
            raise SalfError(f"{source}: not a salf trace (top level is not an object)")
        missing = [k for k in ("model", "data", "task", "num_layers", "spaces") if k not in d]
        if missing:
            raise SalfError(f"{source}: not a salf trace: missing keys {', '.join(missing)}")
        L = d["num_layers"]
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise _field_error(source, "num_layers", "a positive integer", L)
        if d["task"] not in TASKS:
            raise _field_error(source, "task", " or ".join(TASKS), d["task"])
        objects = {k: d.get(k) or {} for k in ("model", "data", "shapes", "timing", "settings",
                                                "extra")}
        for key, value in objects.items():
            if not isinstance(value, dict):
                raise _field_error(source, key, "an object", value)
        return cls(task=d["task"], num_layers=L, spaces=_checked_spaces(d["spaces"], L, source),
                   salf_version=d.get("salf_version", "unknown"),
                   **{k: dict(v) for k, v in objects.items()})

    @classmethod
    def from_json(cls, source: str | Path) -> "Trace":
        """Load from a file path (or from JSON text); errors name the file and the field."""
        text = str(source)
        if text.lstrip().startswith("{"):
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise SalfError(f"trace is not valid JSON: {e}") from None
            return cls.from_dict(d)
        return cls.from_dict(read_json(source, "trace"), source=f"trace {source}")


# --------------------------------------------------------------------------- capture


class TargetCapture:
    """Hooks that keep only the target rows of every latent space.

    `max_retained_bytes` is the largest number of storage bytes held by the
    captured slices at any moment (storage bytes, so a view into a full hidden
    state would count as the whole (B, T, d) tensor).
    """

    def __init__(self, anat):
        self.anat = anat
        self.num_spaces = anat.num_layers + 1
        self.index: tuple[torch.Tensor, torch.Tensor] | None = None
        self.slices: list[torch.Tensor | None] = [None] * self.num_spaces
        self.retained_bytes = 0
        self.max_retained_bytes = 0
        self._handles = []

    def _store(self, space: int, h: torch.Tensor) -> None:
        if h.dim() != 3:
            raise SalfError(f"decoder layer {space} returned hidden states of shape {tuple(h.shape)}; "
                            "expected (batch, seq, hidden)")
        bi, pi = self.index
        s = h.detach()[bi, pi]              # advanced indexing: a fresh (n, d) tensor
        self.slices[space] = s
        self.retained_bytes += s.untyped_storage().nbytes()
        self.max_retained_bytes = max(self.max_retained_bytes, self.retained_bytes)

    def attach(self) -> "TargetCapture":
        def pre_hook(_module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            if h is None:
                raise SalfError("could not find the hidden states passed to decoder layer 1")
            self._store(0, h)

        def make_hook(i):
            def hook(_module, _inputs, output):
                self._store(i + 1, layer_output(output))
            return hook

        self._handles.append(self.anat.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i, layer in enumerate(self.anat.layers):
            self._handles.append(layer.register_forward_hook(make_hook(i)))
        return self

    def take(self) -> list[torch.Tensor]:
        out = self.slices
        if any(s is None for s in out):
            missing = [i for i, s in enumerate(out) if s is None]
            raise SalfError(f"latent spaces {missing} were not captured: did the model skip layers?")
        self.slices = [None] * self.num_spaces
        self.retained_bytes = 0
        return out

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.slices = [None] * self.num_spaces
        self.retained_bytes = 0


# --------------------------------------------------------------------------- helpers


def _task_kind(task) -> str | None:
    if task is None:
        return None
    if isinstance(task, str):
        kind = task.lower()
    else:
        kind = "classification" if hasattr(task, "verbalizer") else \
            "sft" if type(task).__name__.lower().startswith("sft") else None
    if kind not in ("classification", "sft"):
        raise SalfError(f"unknown task kind {task!r}; expected 'classification' or 'sft'")
    return kind


def _batch_kind(batch) -> str:
    return "classification" if "target_ids" in batch else "sft"


def auc(scores, positive) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None if a class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0      # mean of 1-based ranks a+1..b
    u = ranks[p].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _margin_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    k = scores.shape[1]
    if k == 2:
        return auc(scores[:, 1] - scores[:, 0], labels == 1)
    vals = [auc(scores[:, c], labels == c) for c in range(k)]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _model_shapes(model, anat) -> dict:
    cfg = text_config(getattr(model, "config", None))
    V, d = anat.unembedding.shape
    return {"num_layers": anat.num_layers, "hidden_size": int(d), "vocab_size": int(V),
            "intermediate_size": config_value(cfg, "intermediate_size", "n_inner", "ffn_dim"),
            "num_attention_heads": config_value(cfg, "num_attention_heads", "n_head"),
            "num_key_value_heads": config_value(cfg, "num_key_value_heads"),
            "tied_embeddings": bool(anat.tied), "dtype": str(anat.unembedding.dtype)}


def _targets(batch, kind, label_ids, max_per_example, gen):
    """(batch_idx, pos_idx, target ids, label index or None) for one batch, on CPU."""
    ids = batch["input_ids"]
    B, T = ids.shape
    if kind == "classification":
        mask = batch.get("attention_mask")
        if mask is not None and not bool((mask[:, -1] != 0).all()):
            raise SalfError("classification batches must be left-padded: the last position of "
                            "every row must be a real token (attention_mask[:, -1] == 1)")
        y = batch["target_ids"].reshape(-1).long().cpu()
        pos = {t: i for i, t in enumerate(label_ids)}
        try:
            derived = torch.tensor([pos[int(t)] for t in y], dtype=torch.long)
        except KeyError as e:
            raise SalfError(f"target id {e.args[0]} is not one of the label token ids {label_ids}") from None
        if "label_index" in batch:
            li = batch["label_index"].reshape(-1).long().cpu()
            if not torch.equal(li, derived):
                raise SalfError("batch label_index does not match target_ids under the given "
                                "label_token_ids order")
        return torch.arange(B), torch.full((B,), T - 1, dtype=torch.long), y, derived
    if "labels" not in batch:
        raise SalfError("SFT batches need 'labels' (-100 outside the response)")
    labels = batch["labels"].long().cpu()
    valid = labels[:, 1:] != -100                 # position p predicts labels[:, p + 1]
    bis, pis = [], []
    for b in range(B):
        p = torch.nonzero(valid[b], as_tuple=False).reshape(-1)
        if max_per_example is not None and p.numel() > max_per_example:
            keep = torch.randperm(p.numel(), generator=gen)[:max_per_example]
            p = p[keep.sort().values]
        bis.append(torch.full_like(p, b))
        pis.append(p)
    bi, pi = torch.cat(bis), torch.cat(pis)
    return bi, pi, labels[bi, pi + 1], None


class _Accumulator:
    """Running sums over target positions, one entry per latent space."""

    def __init__(self, num_spaces):
        n = num_spaces
        self.n = 0
        self.dev = [0.0] * n
        self.dev_sq = [0.0] * n
        self.ce = [0.0] * n
        self.correct = [0] * n
        self.scores: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.labels: list[np.ndarray] = []
        self.ll_ce = [0.0] * n
        self.ll_correct = [0] * n
        self.cosines: list[list[float]] = [[] for _ in range(n)]   # per target, if kept

    def add(self, part: dict) -> None:
        """Add one batch's statistics (`_TraceRun._batch_statistics`): the same additions, in
        the same order, whichever process computed them."""
        self.n += part["n"]
        if part["labels"] is not None:
            self.labels.append(part["labels"])
        for l, s in enumerate(part["spaces"]):
            self.cosines[l].extend(s["cosines"])
            self.dev[l] += s["dev"]
            self.dev_sq[l] += s["dev_sq"]
            if "ce" in s:
                self.ce[l] += s["ce"]
                self.correct[l] += s["correct"]
                self.scores[l].append(s["scores"])
            for ce, correct in s["lens"]:
                self.ll_ce[l] += ce
                self.ll_correct[l] += correct


# --------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class TraceMeta:
    """What the caller knows about a trace's inputs, stored in it as given: `model` (default:
    the model's name_or_path and class), `data` (merged with the sample hash the trace
    computes), `shapes` (merged over the model's own shape) and `extra`."""

    model: dict | None = None
    data: dict | None = None
    shapes: dict | None = None
    extra: dict | None = None


def trace(model, anat, batches, config: TraceConfig | None = None, *, meta: TraceMeta | None = None,
          capture_callback=None, ranks: tuple[int, int] | None = None, **options) -> Trace:
    """Run the streaming transition trace over `batches` and return a `Trace`.

    batches: iterable of dicts in the `salf.data.collate` format (classification:
    left-padded `input_ids`, `attention_mask`, `target_ids`, optional `label_index`;
    SFT: `input_ids`, `attention_mask`, `labels`). `config`: a `salf.config.TraceConfig`
    (None: the defaults) whose `task_kind` is "classification" | "sft" (a task object or
    None = infer from the batches); `label_token_ids` (label order) is required for
    classification. `meta`: the caller's metadata stored in the trace (`TraceMeta`).
    `config.position_ids_from_mask`: pass position_ids = cumsum(mask) - 1 so left
    padding does not shift positions (skipped if the model does not accept them).
    `capture_callback(capture)` is called after the run with the `TargetCapture`
    (its `max_retained_bytes` is what the memory test checks).
    `config.target_cosines`: also keep cos(t_l, b_y) of every target in every space, in
    `extra["target_cosines"]` ([space][target], targets in batch order) — how much each
    target moved between two traces of the same rows (dynamic freezing's plasticity).
    `ranks` = (rank, world_size) under a launcher: this process runs the forward of every
    world_size-th batch from `rank` on; the per-batch statistics of all ranks are gathered
    (torch.distributed: every rank calls) and added in batch order, so every rank returns the
    trace one process computes on the same batches (docs/multi-gpu.md).

    The keyword arguments of before TraceConfig still work: `options` are config fields
    (`max_targets_per_example` is `max_targets`) or `model_info`/`data_info`/`shapes`/`extra`
    (TraceMeta's fields), and a `config` that is no TraceConfig is the task kind.
    """
    config, meta = _trace_inputs(config, meta, options)
    kind, label_ids = _checked_arguments(anat, config.task_kind, config.label_token_ids)
    run = _TraceRun(model, anat, kind, label_ids, config, ranks=ranks)
    t_start = time.perf_counter()
    run.run(batches, config.progress)
    if capture_callback is not None:
        capture_callback(run.capture)
    if run.sums.n == 0:
        raise SalfError("no target positions in the analysis sample (empty batches, or SFT labels "
                        "all -100?)")
    spaces = _spaces_from_sums(run.sums, run.kind, anat.num_layers, config.logit_lens)
    return _build_trace(run, spaces, time.perf_counter() - t_start, meta)


# trace's keyword arguments of before TraceConfig: a config field's old name, TraceMeta's fields
_OLD_CONFIG_NAMES = {"max_targets_per_example": "max_targets"}
_OLD_META_NAMES = {"model_info": "model", "data_info": "data", "shapes": "shapes", "extra": "extra"}


def _trace_inputs(config, meta, options: dict) -> tuple[TraceConfig, TraceMeta]:
    """(the TraceConfig, the TraceMeta) of trace's arguments, old keyword arguments included."""
    if config is not None and not isinstance(config, TraceConfig):
        options = {"task_kind": config, **options}   # the old 4th positional argument
        config = None
    old_meta = {_OLD_META_NAMES[k]: options.pop(k) for k in list(options) if k in _OLD_META_NAMES}
    meta = dataclasses.replace(meta or TraceMeta(), **old_meta)
    fields = {_OLD_CONFIG_NAMES.get(k, k): v for k, v in options.items()}
    return TraceConfig.with_options(config, fields, "trace"), meta


def _checked_arguments(anat, task_kind, label_token_ids) -> tuple[str | None, list | None]:
    """(task kind or None = infer from the batches, label ids as ints or None); SalfError if unusable."""
    kind = _task_kind(task_kind)
    if anat.num_layers < 1:
        raise SalfError("model has no decoder layers")
    if kind == "classification" or (kind is None and label_token_ids is not None):
        if not label_token_ids:
            raise SalfError("classification traces need label_token_ids (one first-token id per label)")
    label_ids = [int(t) for t in label_token_ids] if label_token_ids is not None else None
    if label_ids is not None and len(set(label_ids)) != len(label_ids):
        raise SalfError(f"label token ids collide: {label_ids}")
    return kind, label_ids


def _input_device(model, anat) -> torch.device:
    if hasattr(anat.model, "get_input_embeddings"):
        return anat.model.get_input_embeddings().weight.device
    return next(model.parameters()).device


def _label_directions(anat, label_ids, cache_dir) -> torch.Tensor | None:
    """Unit-length semantic basis vectors of the labels (rows in label order); None for SFT."""
    if label_ids is None:
        return None
    return F.normalize(semantic_basis(anat, label_ids, cache_dir=cache_dir), dim=-1)


def _progress_bar(batches, progress: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return batches
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc="trace", unit="batch", disable=not progress)


class _TraceRun:
    """One trace in progress: the hooks, the running sums, the sample hash and the timers."""

    def __init__(self, model, anat, kind, label_ids, config: TraceConfig, ranks=None):
        self.model, self.anat = model, anat
        self.kind, self.label_ids = kind, label_ids
        self.tau, self.logit_lens = config.tau, config.logit_lens
        self.max_targets, self.seed = config.max_targets, config.seed
        self.position_ids_from_mask = config.position_ids_from_mask
        self.keep_cosines = config.target_cosines
        self.basis_cache_dir = config.basis_cache_dir
        self.device = _input_device(model, anat)
        self.accepts_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        self.gen = torch.Generator().manual_seed(int(self.seed))
        self.label_hat = _label_directions(anat, label_ids, self.basis_cache_dir)
        self.sums = _Accumulator(anat.num_layers + 1)
        self.ranks = ranks
        self.parts: list[tuple[int, dict]] = []   # (batch index, statistics) of this rank's batches
        self.capture = TargetCapture(anat)
        self.sample_hash = hashlib.sha256()
        self.n_examples = self.n_batches = 0
        self.t_forward = self.t_stats = 0.0

    def run(self, batches, progress: bool) -> None:
        """Every batch in eval mode under inference_mode; hooks removed and mode restored after."""
        was_training = self.model.training
        self.model.eval()
        self.capture.attach()
        try:
            with torch.inference_mode():
                for batch in _progress_bar(batches, progress):
                    self.add_batch(batch)
        finally:
            self.capture.detach()
            self.capture.index = None
            self.model.train(was_training)
        if self.ranks is not None:
            self._add_all_ranks()

    def _owns(self, index: int) -> bool:
        return self.ranks is None or index % self.ranks[1] == self.ranks[0]

    def _add_all_ranks(self) -> None:
        """Every rank's batch statistics, added in batch order (the one-process additions)."""
        from ..distributed import all_gather

        parts = [part for rank_parts in all_gather(self.parts) for part in rank_parts]
        for _, part in sorted(parts, key=lambda p: p[0]):
            self.sums.add(part)

    def add_batch(self, batch: dict) -> None:
        self._settle_kind(batch)
        ids = batch["input_ids"]
        if ids.dim() != 2:
            raise SalfError(f"input_ids must be (batch, seq), got {tuple(ids.shape)}")
        # targets and sample hash of every batch (the target sampler's RNG advances as in one process)
        bi, pi, y, li = _targets(batch, self.kind, self.label_ids, self.max_targets, self.gen)
        index = self.n_batches
        self._record_sample(ids, y)
        if y.numel() == 0 or not self._owns(index):
            return
        t0 = time.perf_counter()
        self._forward(batch, bi, pi)
        t1 = time.perf_counter()
        self.t_forward += t1 - t0
        part = self._batch_statistics(self.capture.take(), y, li)
        if self.ranks is None:
            self.sums.add(part)
        else:
            self.parts.append((index, part))
        self.t_stats += time.perf_counter() - t1

    def _settle_kind(self, batch: dict) -> None:
        """The task kind from the first batch when not given; every batch must agree with it."""
        bkind = _batch_kind(batch)
        if self.kind is None:
            self.kind = bkind
        elif bkind != self.kind:
            raise SalfError(f"batch looks like {bkind} but the task is {self.kind}")
        if self.kind == "classification" and self.label_ids is None:
            raise SalfError("classification traces need label_token_ids")

    def _record_sample(self, ids: torch.Tensor, y: torch.Tensor) -> None:
        """Hash the input ids and targets (the trace's `sample_hash`) and count the batch."""
        ids_cpu = ids.detach().cpu().contiguous()
        self.sample_hash.update(str(tuple(ids_cpu.shape)).encode())
        self.sample_hash.update(ids_cpu.numpy().tobytes())
        self.sample_hash.update(y.numpy().tobytes())
        self.n_examples += ids.shape[0]
        self.n_batches += 1

    def _forward(self, batch: dict, bi: torch.Tensor, pi: torch.Tensor) -> None:
        """One forward pass up to the last decoder layer (nothing after it runs); the hooks
        keep the target rows."""
        mask = batch.get("attention_mask")
        kwargs = {"input_ids": batch["input_ids"].to(self.device), "use_cache": False}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(self.device)
            if self.accepts_position_ids and self.position_ids_from_mask:
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0).to(self.device)
        self.capture.index = (bi.to(self.device), pi.to(self.device))
        run_to_layer(self.model, self.anat.layers[-1], kwargs)

    def _batch_statistics(self, slices: list[torch.Tensor], y: torch.Tensor, li) -> dict:
        """Every space's statistics of one batch's target rows (module doc), for _Accumulator.add."""
        dev = slices[0].device
        y_dev = y.to(dev)
        li_dev = li.to(dev) if li is not None else None
        lab_hat = self.label_hat.to(dev) if self.kind == "classification" else None
        b_hat = self._target_directions(y, li_dev, lab_hat, dev)
        spaces = []
        for l, s in enumerate(slices):
            t, tf = _normed_space(self.anat, s, l)
            t_hat = F.normalize(tf, dim=-1)
            dev_l = 1.0 - (t_hat * b_hat).sum(-1)
            space = {"cosines": (1.0 - dev_l).tolist() if self.keep_cosines else [],
                     "dev": float(dev_l.sum()), "dev_sq": float((dev_l.double() ** 2).sum()),
                     "lens": (self._logit_lens(t, y_dev, li_dev)
                              if _lens_at(self.logit_lens, l, len(slices) - 1) else [])}
            if self.kind == "classification":
                C = t_hat @ lab_hat.T                              # (n, K) cosines
                space.update(ce=float(F.cross_entropy(C / self.tau, li_dev, reduction="sum")),
                             correct=int((C.argmax(-1) == li_dev).sum()), scores=C.cpu().numpy())
            spaces.append(space)
        return {"n": y.numel(), "labels": li.numpy() if self.kind == "classification" else None,
                "spaces": spaces}

    def _target_directions(self, y, li_dev, lab_hat, dev) -> torch.Tensor:
        """b̂_y for every target row: the label's direction, or (SFT) the target token's."""
        if self.kind == "classification":
            return lab_hat[li_dev]
        uniq, inverse = torch.unique(y, return_inverse=True)
        basis = semantic_basis(self.anat, uniq, cache_dir=self.basis_cache_dir)
        return F.normalize(basis, dim=-1).to(dev)[inverse.to(dev)]

    def _logit_lens(self, t: torch.Tensor, y_dev, li_dev) -> list[tuple[float, int]]:
        """Full-vocabulary CE (and label-restricted accuracy) of the head applied to t_l, one
        (CE sum, correct) per chunk of targets."""
        chunks, head_dtype = [], self.anat.unembedding.dtype
        for a in range(0, y_dev.numel(), _LOGIT_CHUNK):
            z = self.anat.logits_from_normed(t[a:a + _LOGIT_CHUNK].to(head_dtype)).float()
            correct = 0
            if self.kind == "classification":
                zl = z[:, self.label_ids]
                correct = int((zl.argmax(-1) == li_dev[a:a + _LOGIT_CHUNK]).sum())
            chunks.append((float(F.cross_entropy(z, y_dev[a:a + _LOGIT_CHUNK], reduction="sum")), correct))
        return chunks

    def timing(self, elapsed: float) -> dict:
        return {"seconds": round(elapsed, 4), "forward_seconds": round(self.t_forward, 4),
                "stats_seconds": round(self.t_stats, 4), "batches": self.n_batches,
                "processes": self.ranks[1] if self.ranks else 1,
                "examples": self.n_examples, "targets": self.sums.n,
                "max_retained_bytes": self.capture.max_retained_bytes}

    def settings(self) -> dict:
        return {"tau": self.tau, "label_token_ids": self.label_ids,
                "max_targets_per_example": self.max_targets, "seed": self.seed,
                "logit_lens": self.logit_lens if self.logit_lens == "last" else bool(self.logit_lens),
                "position_ids_from_mask": bool(self.position_ids_from_mask),
                "unembedding_fingerprint": weight_fingerprint(self.anat.unembedding)[:32]}


def _normed_space(anat, s: torch.Tensor, l: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_l = N(h^l), t_l in float32); SalfError if either holds NaN/inf (a broken checkpoint)."""
    if not bool(torch.isfinite(s).all()):
        raise SalfError(f"hidden states contain NaN/inf at layer {l} (a broken checkpoint?)")
    t = anat.normalize(s)
    tf = t.float()
    if not bool(torch.isfinite(tf).all()):
        raise SalfError(f"hidden states contain NaN/inf at layer {l} after the final norm "
                        "(a broken checkpoint?)")
    return t, tf


def _lens_at(logit_lens, space: int, last: int) -> bool:
    """Whether the logit lens is computed at `space`: every space, or ("last") the output only."""
    return bool(logit_lens) and (logit_lens != "last" or space == last)


def _spaces_from_sums(acc, kind, L, logit_lens) -> list[dict]:
    """The per-space records of the trace (SPACE_KEYS) from the running sums."""
    n = acc.n
    labels = np.concatenate(acc.labels) if acc.labels else None
    spaces = []
    for l in range(L + 1):
        mean = acc.dev[l] / n
        var = max(0.0, acc.dev_sq[l] / n - mean * mean)
        s = {"space": l, "deviation": mean,
             "deviation_se": math.sqrt(var / max(1, n - 1)) if n > 1 else None,
             "label_ce": None, "lens_acc": None, "margin_auc": None,
             "logit_lens_ce": acc.ll_ce[l] / n if _lens_at(logit_lens, l, L) else None,
             "logit_lens_acc": None, "n_targets": n}
        if kind == "classification":
            s["label_ce"] = acc.ce[l] / n
            s["lens_acc"] = acc.correct[l] / n
            s["margin_auc"] = _margin_auc(np.concatenate(acc.scores[l]), labels)
            if _lens_at(logit_lens, l, L):
                s["logit_lens_acc"] = acc.ll_correct[l] / n
        spaces.append(s)
    return spaces


def _build_trace(run: _TraceRun, spaces: list[dict], elapsed: float, meta: TraceMeta) -> Trace:
    """The Trace: the spaces, the caller's metadata and what the run measured about itself."""
    model = run.model
    info = _jsonable(meta.model) if meta.model is not None else {
        "name_or_path": getattr(getattr(model, "config", None), "name_or_path", None),
        "class": type(model).__name__}
    data = dict(_jsonable(meta.data) or {}) if meta.data is not None else {}
    data.update(sample_hash=run.sample_hash.hexdigest(), n_examples=run.n_examples,
                n_targets=run.sums.n)
    shape_info = _model_shapes(model, run.anat)
    if meta.shapes:
        shape_info.update(_jsonable(meta.shapes))
    extra = _jsonable(meta.extra) if meta.extra else {}
    if run.keep_cosines:
        extra["target_cosines"] = run.sums.cosines
    return Trace(model=info, data=data, task=run.kind, num_layers=run.anat.num_layers,
                 spaces=spaces, shapes=shape_info, timing=run.timing(elapsed),
                 settings=run.settings(), extra=extra)
