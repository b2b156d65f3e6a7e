"""The audit: prove that frozen weights are bit-identical after training.

`snapshot(model)` hashes the raw bytes of every parameter (SHA-256 over the
tensor's storage bytes, plus dtype and shape), and remembers which parameters
were trainable at that moment. `compare(before, after)` sorts every parameter
into frozen/trainable x unchanged/changed; a frozen parameter that changed is a
violation (SalfError unless `strict=False`). With LoRA the base weights are all
frozen and the adapter weights are the trainable ones — the same rule applies.

Cost: one pass over the weights at ~1.3 GB/s (SHA-256, one CPU core). Measured
on a SmolLM2-135M-shaped model (134.5M parameters, 272 tensors): 0.40 s in fp32,
0.21 s in bf16.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

import torch
from torch import nn

from ..errors import SalfError
from ..io import atomic_write_json


class Snapshot(dict):
    """`{parameter name: sha256}` with `.trainable`: the names that required grad."""

    def __init__(self, hashes: dict[str, str], trainable: Iterable[str] = ()):
        super().__init__(hashes)
        self.trainable = frozenset(trainable)


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


@torch.no_grad()
def snapshot(model: nn.Module, whole=None) -> Snapshot:
    """Hash every parameter (tied weights once, under their first name). `whole(p)` gives a
    sharded parameter's full tensor (salf.distributed.whole_tensor: a collective, so every
    rank calls it)."""
    hashes, trainable = {}, []
    with torch.no_grad():
        for name, p in model.named_parameters():
            hashes[name] = tensor_digest(whole(p) if whole else p)
            if p.requires_grad:
                trainable.append(name)
    return Snapshot(hashes, trainable)


def plan_as_dict(plan) -> dict | None:
    """A plan as a dict: a FreezePlan's to_dict(), or the fields of an object that has them."""
    if plan is None:
        return None
    if callable(getattr(plan, "to_dict", None)):
        return plan.to_dict()
    return {k: v for k, v in vars(plan).items() if not k.startswith("_")}


def compare(before: dict, after: dict, plan=None, *, trainable: Iterable[str] | None = None,
            strict: bool = True) -> dict:
    """Classify every parameter as frozen/trainable x unchanged/changed.

    `trainable` defaults to `before.trainable` (a `Snapshot`). Returns a report
    dict; with `strict=True` a frozen parameter that changed raises SalfError.
    """
    if trainable is None:
        trainable = getattr(before, "trainable", None)
        if trainable is None:
            raise SalfError("audit: `before` is not a Snapshot; pass trainable=<names>")
    trainable = set(trainable)
    frozen_changed, frozen_same, train_changed, train_same = [], [], [], []
    for name, digest in before.items():
        if name not in after:
            continue
        changed = after[name] != digest
        if name in trainable:
            (train_changed if changed else train_same).append(name)
        else:
            (frozen_changed if changed else frozen_same).append(name)
    missing = sorted(set(before) - set(after))
    added = sorted(set(after) - set(before))
    violations = [f"frozen parameter changed: {n}" for n in frozen_changed]
    violations += [f"parameter disappeared: {n}" for n in missing]
    report = {
        "ok": not violations,
        "frozen": {"count": len(frozen_same) + len(frozen_changed), "unchanged": len(frozen_same),
                   "changed": frozen_changed},
        "trainable": {"count": len(train_same) + len(train_changed), "changed": len(train_changed),
                      "unchanged": train_same},
        "missing": missing,
        "added": added,
        "violations": violations,
        "plan": plan_as_dict(plan),
    }
    if strict and violations:
        raise SalfError(f"audit failed: {len(violations)} violation(s), e.g. {violations[0]}")
    return report


def write_audit(path: str | os.PathLike, report: dict, **extra) -> None:
    """Write the audit report (plus any extra fields) as JSON, atomically."""
    atomic_write_json(path, {**report, **extra})
