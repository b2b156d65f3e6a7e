"""A moving cut for a training run: its probe rows and its callback, checked before training.

    splits, rows = split_off_probe(ds.splits, settings)     # the probe's held-out rows
    callback = moving_cut(settings, task, tokenizer, rows, max_length=96, plan=plan, out_dir=out)
    salf.train.train(..., callbacks=[callback])             # train() knows no dynamic policy

The job layer (salf.finetune.run_training, the sweep) calls these; `train` only hands the
callback what every callback with an `attach` method gets (the planned model, the prefix
cache, the cost settings) and lets DDP search for unused parameters (`moves_cut`).
"""

from __future__ import annotations

from pathlib import Path

from .. import distributed
from ..defaults import DEFAULT_MAX_LENGTH
from ..errors import SalfError
from .settings import DynamicSettings


def split_off_probe(splits: dict, settings) -> tuple[dict, list[dict] | None]:
    """(the splits training reads, the probe's rows or None): the probe comes from the
    validation split, so the training rows and their order stay those of a static run."""
    if settings is None or "probe" not in settings.needs:
        return splits, None
    from .probe import probe_rows

    probe, rest = probe_rows(splits, settings.probe_rows, seed=0)
    return rest, probe


def moving_cut(settings, task=None, tokenizer=None, probe_rows: list | None = None, *,
               max_length: int = DEFAULT_MAX_LENGTH, plan=None, out_dir: str | Path | None = None):
    """The DynamicFreezeCallback of `settings` (a DynamicSettings or its dict), refused here,
    before any training, where it cannot run: under a sharding engine, on a plan without a
    contiguous cut, or without probe rows for a policy that probes."""
    from ..train.progress import say
    from .callback import DynamicFreezeCallback
    from .probe import Probe

    settings = DynamicSettings.from_dict(settings) if isinstance(settings, dict) else settings
    distributed.refuse_sharded_dynamic()
    if plan is not None and getattr(plan, "train_embeddings", False):
        raise SalfError("--dynamic needs a plan with a cut to move; full fine-tuning has none")
    if plan is not None and getattr(plan, "layers", None) is not None:
        raise SalfError("--dynamic moves a contiguous cut; a plan with a layer set cannot move")
    probe = None
    if "probe" in settings.needs:
        if not probe_rows:
            raise SalfError(f"--dynamic {settings.policy} reads a held-out probe set, but no probe "
                            "rows were given")
        probe = Probe.from_rows(task, tokenizer, probe_rows, max_length)
    return DynamicFreezeCallback(settings, probe, out_dir=out_dir, log=say)
