"""The probe: the analysis trace, read on the model being trained, over a fixed held-out set.

At every check the controller needs the same semantic quantities the static analysis reads
on the pretrained model — the deviation D_l of every latent space from the targets'
semantic basis (docs/method.md, "Deviation") — plus the model's own task loss on the same
rows. Both come from one `salf.analysis.trace` pass over the probe rows with the logit lens
at the output space only: a forward pass that stops after the last decoder layer and calls
the head at the target positions, never over the whole vocabulary x sequence.

The rows never train and never come from the test split: `probe_rows` takes them from the
validation split (so the training data and its order stay exactly those of a static run),
or, for a dataset without one, from the end of the seeded training order.
"""

from __future__ import annotations

import random
import time

from ..analysis.trace import trace
from ..errors import SalfError
from ..models.anatomy import anatomy, unwrap


def probe_rows(splits: dict[str, list[dict]], n: int, seed: int = 0) -> tuple[list[dict], dict[str, list[dict]]]:
    """(probe rows, splits with the probe rows removed from wherever they came from)."""
    validation = splits.get("validation") or []
    if len(validation) >= n:
        return random.Random(seed).sample(validation, n), splits
    train = list(splits.get("train") or [])
    if len(train) < 2 * n:
        raise SalfError(f"the dynamic probe needs {n} held-out rows (--probe-rows): the dataset "
                        f"has {len(validation)} validation rows and {len(train)} training rows")
    return train[-n:], dict(splits, train=train[:-n])


class Probe:
    """A fixed set of encoded rows, read with the trace at every check."""

    def __init__(self, batches: list[dict], task_kind: str, label_token_ids=None,
                 max_targets: int = 16):
        if not batches:
            raise SalfError("the dynamic probe has no rows")
        self.batches = batches
        self.task_kind = task_kind
        self.label_token_ids = label_token_ids
        self.max_targets = max_targets
        self.rows = sum(int(b["input_ids"].shape[0]) for b in batches)
        self.tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    @classmethod
    def from_rows(cls, task, tokenizer, rows: list[dict], max_length: int, batch_size: int = 8) -> "Probe":
        """Encode `rows` of `task` once into the probe's batches."""
        from ..data import batches

        kind = task.kind
        label_ids = task.label_token_ids(tokenizer) if kind == "classification" else None
        return cls(list(batches(task, tokenizer, rows, batch_size, max_length)), kind, label_ids)

    def read(self, model) -> dict:
        """{"deviation": [D_0..D_L], "loss": task loss at the targets, "seconds"} for `model`
        as it is now (eval mode and no grad for the read; its training mode is restored)."""
        base = unwrap(model)
        start = time.perf_counter()
        tr = trace(base, anatomy(base), self.batches, self.task_kind,
                   label_token_ids=self.label_token_ids, max_targets_per_example=self.max_targets,
                   logit_lens="last", progress=False, seed=0)
        return {"deviation": tr.deviations, "loss": tr.spaces[-1]["logit_lens_ce"],
                "targets": tr.timing["targets"], "seconds": time.perf_counter() - start}
