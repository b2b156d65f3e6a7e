"""FreezePlan: where to cut a model, what is frozen, and why.

A plan with end-of-freezing layer k (`eof`) freezes the embeddings and decoder
layers 1..k and trains layers k+1..L; `eof = 0` freezes only the embeddings.
The head is named explicitly: "frozen", "trainable" (an untied head's own
weight) or "untied-copy" (a trainable copy of a tied unembedding: V x d extra
parameters, no backward below the cut). Full fine-tuning — everything
trainable, embeddings included — is the plan `FreezePlan.full(L)`.

JSON keys are stable (docs/internals.md, "Plan"); `from_json` rejects a file
that is not a plan with a one-line `SalfError`. `check_cut` and `check_head`
are the consistency rules themselves, for callers that hold no FreezePlan.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import SalfError
from .io import atomic_write_json, read_json

SCHEMA = "salf.freeze-plan/1"
HEADS = ("frozen", "trainable", "untied-copy")
MODEL_KEYS = ("spec", "name_or_path", "revision", "weights_hash", "num_layers", "model_type", "tied")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _info_dict(model_info) -> dict:
    """A ModelInfo (dataclass), any object with attributes, or a dict -> dict."""
    if model_info is None:
        return {}
    if isinstance(model_info, dict):
        return dict(model_info)
    if dataclasses.is_dataclass(model_info):
        return dataclasses.asdict(model_info)
    return {k: getattr(model_info, k) for k in MODEL_KEYS if hasattr(model_info, k)}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_head(head, tied: bool | None = None, context: str = "freeze plan") -> None:
    """Raise SalfError (one line, starting with `context`) unless `head` is one of HEADS and
    possible for the model: `tied` says whether its head is tied to the input embedding
    (None: unknown, not checked)."""
    if head not in HEADS:
        raise SalfError(f"{context}: head must be one of {', '.join(HEADS)}, got {head!r}")
    if tied and head == "trainable":
        raise SalfError(f"{context}: head 'trainable' is impossible with tied embeddings (training "
                        "the tied matrix needs backward down to the input); use head 'untied-copy' "
                        "(a trainable copy, V x d extra parameters) or 'frozen'")


def check_cut(eof, num_layers, head="frozen", tied: bool | None = None, train_embeddings=False,
              layers=None, context: str = "freeze plan") -> None:
    """Raise SalfError (one line, starting with `context`) unless the cut is consistent.

    The rules every plan obeys (module docstring): eof in [0, num_layers], a head from
    HEADS that the model allows (`tied`: None = unknown), something to train, full
    fine-tuning only as eof 0 with a trainable head, and an optional non-contiguous
    trainable set `layers` (0-based) whose lowest layer is the cut.
    """
    L, k = num_layers, eof
    if not _is_int(L) or L < 1:
        raise SalfError(f"{context}: num_layers must be a positive integer, got {L!r}")
    if not _is_int(k) or not 0 <= k <= L:
        raise SalfError(f"{context}: eof must be an integer in [0, {L}] (layers frozen), got {k!r}")
    if not isinstance(train_embeddings, bool):
        raise SalfError(f"{context}: train_embeddings must be true or false, got {train_embeddings!r}")
    # full fine-tuning trains the tied matrix through the embedding: any head is possible
    check_head(head, None if train_embeddings else tied, context)
    if layers is not None:
        if not isinstance(layers, list) or not layers or not all(_is_int(i) and k <= i < L for i in layers):
            raise SalfError(f"{context}: layers must be a non-empty list of layer indices in "
                            f"[eof={k}, {L - 1}], got {layers!r}")
        if min(layers) != k:
            raise SalfError(f"{context}: the lowest trainable layer ({min(layers)}) must "
                            f"equal eof ({k}); backward stops there")
    if train_embeddings:
        if k != 0 or head != "trainable":
            raise SalfError(f"{context}: train_embeddings=true means full fine-tuning "
                            f"(eof 0, head trainable), got eof {k} and head {head!r}; "
                            "use FreezePlan.full() or set train_embeddings=false")
    elif k == L and head == "frozen":
        raise SalfError(f"{context}: eof {k} freezes all {L} layers and the head, so nothing "
                        "would train; choose eof < num_layers or head 'untied-copy'/'trainable'")


def layer_span(first: int, last: int) -> str:
    """Decoder layers first..last (1-based) in words: 'layer 3', 'layers 3-5', 'no layer'."""
    if last < first:
        return "no layer"
    return f"layer {first}" if first == last else f"layers {first}-{last}"


@dataclass
class FreezePlan:
    """Which layers to freeze and which to train; see the module docstring."""

    eof: int
    num_layers: int
    head: str = "frozen"
    train_embeddings: bool = False
    policy: str = "manual"
    policy_params: dict = field(default_factory=dict)
    reason: str = ""
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    trace_file: str | None = None
    # Optional non-contiguous trainable set (0-based decoder-layer indices, all >= eof, e.g.
    # Spectrum's pick): layers above the cut that are not listed stay frozen but still pass
    # gradients down. None = every layer above the cut trains (the SALF case).
    layers: list[int] | None = None
    salf_version: str = __version__
    created: str = field(default_factory=_now)

    def __post_init__(self):
        self.validate()

    # -- validation -------------------------------------------------------------------
    @property
    def tied(self) -> bool | None:
        """Whether the model's head is tied to its input embedding, when the plan knows."""
        value = (self.model or {}).get("tied")
        return None if value is None else bool(value)

    @property
    def is_full(self) -> bool:
        return self.train_embeddings

    def validate(self, tied: bool | None = None) -> "FreezePlan":
        """Raise SalfError (one line) if the plan is inconsistent (`check_cut`); returns self."""
        for name in ("policy_params", "model", "data", "predicted"):
            if not isinstance(getattr(self, name), dict):
                raise SalfError(f"freeze plan: {name} must be an object, got "
                                f"{type(getattr(self, name)).__name__}")
        check_cut(self.eof, self.num_layers, self.head, self.tied if tied is None else tied,
                  self.train_embeddings, self.layers)
        model_layers = self.model.get("num_layers")
        if model_layers is not None and model_layers != self.num_layers:
            raise SalfError(f"freeze plan: num_layers {self.num_layers} disagrees with model.num_layers "
                            f"{model_layers}")
        return self

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def full(cls, num_layers: int, **kwargs) -> "FreezePlan":
        """Full fine-tuning: nothing frozen (the baseline every ratio is taken against)."""
        kwargs.setdefault("policy", "full")
        kwargs.setdefault("reason", "full fine-tuning baseline: every parameter trains")
        return cls(eof=0, num_layers=num_layers, head="trainable", train_embeddings=True, **kwargs)

    @classmethod
    def manual(cls, eof: int, num_layers: int, head: str = "frozen", **kwargs) -> "FreezePlan":
        """A user-chosen cut (`--freeze-below K`): embeddings + layers 1..eof frozen."""
        kwargs.setdefault("policy", "manual")
        kwargs.setdefault("policy_params", {"freeze_below": eof})
        kwargs.setdefault("reason", f"manual cut: freeze below layer {eof + 1}")
        return cls(eof=eof, num_layers=num_layers, head=head, **kwargs)

    # -- queries ----------------------------------------------------------------------
    def frozen_layers(self) -> list[int]:
        """0-based indices of the frozen decoder layers (layers[0..eof-1])."""
        return [] if self.train_embeddings else list(range(self.eof))

    def trainable_layers(self) -> list[int]:
        """0-based indices of the trained decoder layers (layers[eof..L-1])."""
        if self.train_embeddings:
            return list(range(self.num_layers))
        if self.layers is not None:
            return sorted(self.layers)
        return list(range(self.eof, self.num_layers))

    def _head_text(self) -> str:
        tied = self.tied
        if self.head == "untied-copy":
            return "head trained as an untied copy"
        suffix = " (tied)" if tied else " (untied)" if tied is False else ""
        return f"head {self.head}{suffix}"

    def describe(self) -> str:
        """One line, e.g. 'freeze embeddings + layers 1-22 of 30, train 23-30, head frozen (tied)'."""
        L, k = self.num_layers, self.eof
        frozen = f"embeddings + {layer_span(1, k)} of {L}" if k else "embeddings"
        if self.layers is not None:
            noun = "layer" if len(self.layers) == 1 else "layers"
            return (f"freeze {frozen}, train only {noun} "
                    f"{', '.join(str(i + 1) for i in self.layers)}, {self._head_text()}")
        if self.train_embeddings:
            tied = " (tied)" if self.tied else ""
            return f"full fine-tuning: train embeddings + {layer_span(1, L)} of {L} + head{tied}"
        if k == L:
            what = "an untied copy of the head" if self.head == "untied-copy" else "the head"
            return f"freeze {frozen}, train only {what}"
        if k == 0:
            return f"freeze embeddings, train {layer_span(1, L)} of {L}, {self._head_text()}"
        trained = f"{k + 1}" if k + 1 == L else f"{k + 1}-{L}"
        return f"freeze {frozen}, train {trained}, {self._head_text()}"

    def check_model(self, model_info, num_layers: int, allow_different_weights: bool = False,
                    override: str = "--allow-different-weights") -> None:
        """Raise SalfError if this plan does not belong to the given model.

        A layer-count mismatch is always an error. A weights-hash mismatch (same
        layer count) is an error unless `allow_different_weights=True` — e.g. a plan
        made on the base model applied to its instruct variant. `override` is how the
        caller's user says that (the CLI flag, or apply_plan's keyword).
        """
        info = _info_dict(model_info)
        name = info.get("name_or_path") or info.get("spec") or "the model"
        planned_for = self.model.get("name_or_path") or self.model.get("spec") or "another model"
        if num_layers != self.num_layers:
            raise SalfError(f"plan mismatch: num_layers differs — the plan is for {self.num_layers} decoder "
                            f"layers ({planned_for}) but {name} has {num_layers}; re-run `salf plan` "
                            "for this model")
        ours, theirs = self.model.get("weights_hash"), info.get("weights_hash")
        if ours and theirs and ours != theirs and not allow_different_weights:
            raise SalfError(f"plan mismatch: weights_hash differs — the plan was made for {planned_for} "
                            f"({str(ours)[:12]}) but {name} has {str(theirs)[:12]}; re-run `salf plan`, "
                            f"or pass {override} to apply it anyway")
        tied = info.get("tied")
        if tied is not None:
            self.validate(tied=bool(tied))

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"schema": SCHEMA}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = json.loads(json.dumps(value, default=str)) if isinstance(value, dict) else value
        return data

    @classmethod
    def from_dict(cls, data, source: str = "freeze plan") -> "FreezePlan":
        if not isinstance(data, dict):
            raise SalfError(f"{source}: not a salf freeze plan (expected a JSON object, got "
                            f"{type(data).__name__})")
        schema = data.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise SalfError(f"{source}: not a salf freeze plan (schema {schema!r}, expected {SCHEMA!r})")
        missing = [k for k in ("eof", "num_layers") if k not in data]
        if missing:
            raise SalfError(f"{source}: not a salf freeze plan (missing {', '.join(missing)})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and k != "schema")
        if unknown:
            raise SalfError(f"{source}: unknown key(s) {', '.join(unknown)} in freeze plan "
                            f"(schema {SCHEMA})")
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("policy_params", "model", "data", "predicted"):
            if kwargs.get(key) is None and key in kwargs:
                kwargs[key] = {}
        try:
            return cls(**kwargs)
        except SalfError as exc:
            raise SalfError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise SalfError(f"{source}: malformed freeze plan ({exc})") from None

    def to_json(self, path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path) -> "FreezePlan":
        """A plan from its JSON file (str or Path), or from that file already parsed (a dict)."""
        if isinstance(path, dict):
            return cls.from_dict(path)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"FreezePlan.from_json: path must be a plan.json path (str or Path) "
                            f"or its parsed dict, got {type(path).__name__}")
        return cls.from_dict(read_json(path, "freeze plan"), source=f"freeze plan {path}")
