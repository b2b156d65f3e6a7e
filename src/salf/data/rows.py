"""Which rows a job reads, and those rows as batches (what analysis, training, evaluation,
the sweep and the benchmarks share).

    first_rows(ds, "test", 1000)          the first rows of a split (its order is seeded and fixed)
    sample_rows(rows, 256, seed, what)    a seeded sample
    make_batches(task, tok, rows, 8, 96)  every row encoded and collated, as a list of batches
"""

from __future__ import annotations

import random

from ..errors import SalfError
from .tasks import batches


def first_rows(ds, split: str = "test", samples: int | None = None) -> list[dict]:
    """The first `samples` rows of a split of `ds` (a TaskDataset; all of them without
    `samples`): a fixed, already seeded selection, so `salf evaluate` reproduces a run's."""
    if split not in ds.splits:
        raise SalfError(f"dataset {ds.name} has no split {split!r} (has: {', '.join(ds.splits)})")
    rows = ds.splits[split]
    if not rows:
        raise SalfError(f"dataset {ds.name}: split {split!r} is empty")
    if samples is not None and samples <= 0:
        raise SalfError(f"--samples must be positive, got {samples}")
    return rows[:samples] if samples else list(rows)


def sample_rows(rows: list[dict], n: int | None, seed: int, what: str) -> list[dict]:
    """A seeded sample of n rows (all rows when n is None or >= len)."""
    if n is not None and n <= 0:
        raise SalfError(f"{what}: the number of examples must be positive, got {n}")
    if not rows:
        raise SalfError(f"{what}: the split is empty")
    if n is None or n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)


def make_batches(task, tokenizer, rows, batch_size: int, max_length: int) -> list[dict]:
    """`rows` encoded and collated in order (salf.data.batches, kept as a list: the trace
    and the probe read them more than once)."""
    out = list(batches(task, tokenizer, rows, batch_size, max_length))
    if not out:
        raise SalfError("no example left after tokenization (all responses empty or too long?)")
    return out
