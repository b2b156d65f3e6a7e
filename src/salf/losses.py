"""The fine-tuning losses and the forward arguments they need, shared by training,
evaluation and the selectors that score layers with a loss (grad-norm).

Classification (left-padded batches, target at position -1): the model runs with
`logits_to_keep=1`, so the unembedding is applied at the label position only.
SFT (right-padded, labels -100 outside the response): logits only at positions
that predict a response token. Left-padded batches get `position_ids` counted
from the first real token, so absolute-position models (GPT-2, OPT) see the same
positions as without padding.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SalfError
from .models.anatomy import unwrap

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- forward helpers


@lru_cache(maxsize=64)
def _accepts_position_ids(cls: type) -> bool:
    try:
        return "position_ids" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _hf_model(model: nn.Module) -> nn.Module:
    return unwrap(model)


def is_classification_batch(batch: dict) -> bool:
    return "target_ids" in batch


def model_inputs(model: nn.Module, batch: dict, extra_target: bool = False) -> dict:
    """Forward kwargs for a collated batch (input_ids, attention_mask, position_ids, use_cache).

    `extra_target=True` appends the classification target token (used by the
    full-sequence "lm" loss).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if extra_target:
        ids = torch.cat([ids, batch["target_ids"][:, None].to(ids)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    out = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if is_classification_batch(batch) and _accepts_position_ids(type(_hf_model(model))):
        out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return out


def label_position_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, V) float logits at the last position (the label position), head applied there only."""
    out = model(**model_inputs(model, batch), logits_to_keep=1)
    return out.logits[:, -1].float()


def _response_ce(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(CE per row and kept position, mask of response targets) for an SFT batch; None if the
    batch has no response token. Logits are computed only at positions that predict a
    response token in some row (position p predicts labels[p+1])."""
    targets_next = batch["labels"][:, 1:]
    keep = (targets_next != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return None
    logits = model(**model_inputs(model, batch), logits_to_keep=keep).logits.float()  # (B, K, V)
    targets = targets_next[:, keep]                                                    # (B, K)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                         reduction="none")                                             # 0 if ignored
    return ce, targets != IGNORE_INDEX


def response_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of CE over response tokens, number of response tokens) for an SFT batch."""
    res = _response_ce(model, batch)
    if res is None:
        zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return zero, 0
    ce, mask = res
    return ce.sum(), int(mask.sum())


@torch.no_grad()
def response_loss_per_example(model: nn.Module, batch: dict) -> tuple[list[float], list[int]]:
    """Per-row (sum of CE over its response tokens, number of them) for an SFT batch."""
    res = _response_ce(model, batch)
    if res is None:
        rows = batch["labels"].shape[0]
        return [0.0] * rows, [0] * rows
    ce, mask = res
    return ce.sum(-1).tolist(), mask.sum(-1).tolist()


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over every real token, count): the full-sequence LM loss.
    Classification batches include the label token as the last token."""
    cls = is_classification_batch(batch)
    inputs = model_inputs(model, batch, extra_target=cls)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    logits = model(**inputs).logits[:, :-1].float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def batch_loss(model: nn.Module, batch: dict, kind: str = "label") -> torch.Tensor:
    """The training loss of one batch (a mean).

    kind="label": classification -> CE of the label token at the last position
    (full vocabulary); SFT -> mean CE over response tokens. kind="lm": mean
    next-token CE over the whole sequence.
    """
    if kind == "label":
        if is_classification_batch(batch):
            return F.cross_entropy(label_position_logits(model, batch), batch["target_ids"])
        total, n = response_loss(model, batch)
    elif kind == "lm":
        total, n = lm_loss(model, batch)
    else:
        raise SalfError(f"unknown loss {kind!r}; expected 'label' or 'lm'")
    return total / max(n, 1)
