"""The common shape of every baseline selector: its input (`SelectorContext`)
and its answer (`Selection`), plus the small helpers the selectors share.

A selector answers "which decoder layers should fine-tuning train?". SALF's
own answer is always a prefix cut (freeze embeddings + layers 1..k, train
k+1..L); some baselines pick a non-contiguous set instead. Both are expressed
the same way so the sweep can put every selector on one cost axis:

- `eof` is the cut k when the answer is a prefix cut, else None;
- `trainable_layers` is always the explicit 0-based list of trained layers;
- `eof_equivalent` is the cut with the same number of trainable layers
  (L - len(trainable_layers)), for cost comparison.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SalfError
from ..losses import batch_loss, model_inputs
from ..models.anatomy import Anatomy, anatomy


@dataclass
class Selection:
    """One selector's answer. Layer indices are 0-based (`layers[i]` is decoder layer i+1)."""

    name: str
    eof: int | None                  # prefix cut k (layers 1..k frozen), None = not a prefix cut
    trainable_layers: list[int]      # 0-based, ascending
    scores: list[float] | None       # per layer (0-based), when the selector scores layers
    lora: bool
    reason: str
    params: dict = field(default_factory=dict)
    eof_equivalent: int = 0          # cut with as many trainable layers (for cost comparison)
    num_layers: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Selection":
        return cls(**data)


@dataclass
class SelectorContext:
    """What a selector may look at.

    `batches` is a zero-argument callable returning a fresh iterator of batches in
    the `salf.data.collate` format (docs/internals.md); weights-only selectors
    ignore it and it may be None for them. `budget_layers` (how many layers to
    train, for selectors that rank layers) defaults to max(1, L // 2).
    """

    model: nn.Module
    anat: Anatomy | None = None
    batches: Callable[[], Iterable[dict]] | None = None
    num_layers: int | None = None
    budget_layers: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.anat is None:
            self.anat = anatomy(self.model)
        if self.num_layers is None:
            self.num_layers = self.anat.num_layers
        if self.num_layers != self.anat.num_layers:
            raise SalfError(f"selector context says {self.num_layers} layers but the model has "
                            f"{self.anat.num_layers}")
        if self.num_layers < 1:
            raise SalfError("the model has no decoder layers to select from")

    @property
    def budget(self) -> int:
        """The number of layers to train, validated to 1..L."""
        L = self.num_layers
        b = max(1, L // 2) if self.budget_layers is None else self.budget_layers
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= L:
            raise SalfError(f"budget_layers must be an integer in 1..{L}, got {b!r}")
        return b

    def iter_batches(self, max_batches: int | None, who: str) -> Iterator[dict]:
        """Up to `max_batches` batches (all if None); SalfError if there are none."""
        if self.batches is None:
            raise SalfError(f"selector {who!r} needs data: give the context a batches callable")
        count = 0
        for batch in self.batches():
            if max_batches is not None and count >= max_batches:
                break
            count += 1
            yield batch
        if count == 0:
            raise SalfError(f"selector {who!r} got no batches")


# ----------------------------------------------------------------- helpers

def prefix_selection(name: str, ctx: SelectorContext, eof: int, reason: str, *,
                     scores: list[float] | None = None, lora: bool = False,
                     params: dict | None = None) -> Selection:
    """A prefix-cut Selection: layers 1..eof frozen, eof+1..L trained."""
    L = ctx.num_layers
    if not 0 <= eof <= L - 1:
        raise SalfError(f"{name}: cut {eof} is outside 0..{L - 1} (at least one layer must train)")
    return Selection(name=name, eof=eof, trainable_layers=list(range(eof, L)), scores=scores,
                     lora=lora, reason=reason, params=dict(params or {}), eof_equivalent=eof,
                     num_layers=L)


def set_selection(name: str, ctx: SelectorContext, trainable: Iterable[int], reason: str, *,
                  scores: list[float] | None = None, params: dict | None = None) -> Selection:
    """A non-prefix Selection; `eof` is None unless the set happens to be a suffix."""
    L = ctx.num_layers
    layers = sorted(set(int(i) for i in trainable))
    if not layers or layers[0] < 0 or layers[-1] >= L:
        raise SalfError(f"{name}: invalid trainable layer set {layers} for {L} layers")
    return Selection(name=name, eof=None, trainable_layers=layers, scores=scores, lora=False,
                     reason=reason, params=dict(params or {}), eof_equivalent=L - len(layers),
                     num_layers=L)


def top_layers(scores: list[float], k: int) -> list[int]:
    """0-based indices of the k highest scores; ties go to the deeper layer."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))
    return sorted(order[:k])


def cut_phrase(k: int, L: int) -> str:
    """'freeze layers 1..k, train k+1..L' in words, with the k = 0 case spelled out."""
    if k == 0:
        return f"freeze only the embeddings, train layers 1..{L}"
    return f"freeze layers 1..{k}, train {k + 1}..{L}"


def human_layers(indices: Iterable[int]) -> str:
    """0-based indices as the 1-based decoder-layer numbers users see."""
    return ",".join(str(i + 1) for i in sorted(indices)) or "none"


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def accepts_kwarg(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params  # only an explicit parameter: **kwargs may forward it anywhere


def forward_kwargs(model: nn.Module, batch: dict, last_only: bool) -> dict[str, Any]:
    """Forward kwargs of a collated batch (position ids for left padding; logits at the last
    position only when `last_only`) — the same as training uses (salf.losses)."""
    kwargs = model_inputs(model, batch)
    if last_only and accepts_kwarg(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    return kwargs


def training_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The fine-tuning loss of one batch, exactly as `salf train` computes it (salf.losses):
    classification -> CE of the label token at the last position over the full vocabulary;
    SFT -> mean CE over response tokens."""
    if "target_ids" not in batch and "labels" not in batch:
        raise SalfError("SFT batch has no 'labels' (and no 'target_ids' for classification)")
    return batch_loss(model, batch, "label")
