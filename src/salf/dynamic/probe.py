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

import contextlib
import random
import time

from ..analysis.trace import trace
from ..errors import SalfError
from ..models.anatomy import anatomy, unwrap
from ..models.replay import LayerOutput, capture_output, replay_stored


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
    """A fixed set of encoded rows, read with the trace at every check.

    Layers below the cut are frozen, so their output on the probe rows never changes: a read
    at the cut k stores h^k for every probe batch, and the next reads replay it instead of
    running layers 1..k (their spaces' deviations are the stored read's). A read after the cut
    moved deeper, to m, starts from the stored h^k too — layers k+1..m run with their weights
    of now, which froze with the move — and stores h^m on the way: each frozen layer runs once
    after it froze, never again (`salf.models.replay` keeps h^k and replays it).
    """

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
        self._boundary = 0                        # the cut the stored states belong to
        self._states: list[LayerOutput | None] = [None] * len(batches)  # per batch: h^boundary
        self._last = None     # the last read's (D_0..D_L, per-target cosines per space)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """The stored read (boundary, the last deviations and cosines), without its tensors."""
        return {"boundary": self._boundary, "last": self._last,
                "as_tuple": [s.as_tuple if s is not None else None for s in self._states]}

    def tensor_state_dict(self) -> dict:
        """The stored h^boundary per probe batch (none before the first read past a cut)."""
        return {f"h{i}": s.hidden for i, s in enumerate(self._states) if s is not None}

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        """Restore a saved read; without all its tensors the next read runs every layer."""
        if len(state["as_tuple"]) != len(self.batches):
            raise SalfError("--resume: the checkpoint's probe has another number of batches")
        states = [LayerOutput(tensors[f"h{i}"], flag) if f"h{i}" in tensors else None
                  for i, flag in enumerate(state["as_tuple"])]
        if all(s is not None for s in states):
            self._states, self._boundary = states, int(state["boundary"])
            last = state["last"]
            self._last = (last[0], last[1]) if last is not None else None

    @classmethod
    def from_rows(cls, task, tokenizer, rows: list[dict], max_length: int, batch_size: int = 8) -> "Probe":
        """Encode `rows` of `task` once into the probe's batches."""
        from ..data import batches

        kind = task.kind
        label_ids = task.label_token_ids(tokenizer) if kind == "classification" else None
        return cls(list(batches(task, tokenizer, rows, batch_size, max_length)), kind, label_ids)

    def read(self, model, cut: int = 0) -> dict:
        """{"deviation": [D_0..D_L], "cosines": [space][target] cos(t_l, b_y), "loss": task
        loss at the targets, "targets", "seconds", "from_layer": the first decoder layer that
        ran} for `model` as it is now (eval mode and
        no grad for the read; its training mode is restored). `cut`: the layers below it are
        frozen (0: nothing to skip); a cut only ever moves deeper between reads."""
        base = unwrap(model)
        anat = anatomy(base)
        stored = all(s is not None for s in self._states)
        # the stored boundary's states hold while the cut is at or past it (frozen below it)
        start = self._boundary if stored and 0 < self._boundary <= cut else 0
        began = time.perf_counter()
        dev_sum, loss_sum, targets = None, 0.0, 0
        cosines: list[list[float]] = [[] for _ in range(anat.num_layers + 1)]
        for i, batch in enumerate(self.batches):
            with contextlib.ExitStack() as stack:
                if start:   # layers 1..start pass through, layer `start` returns the stored h^start
                    stack.enter_context(replay_stored(anat.layers, start, self._states[i]))
                keep = None
                if cut > start:   # h^cut at every position, for the next reads
                    keep = stack.enter_context(capture_output(anat.layers[cut - 1], clone=True))
                tr = trace(base, anat, [batch], self.task_kind, label_token_ids=self.label_token_ids,
                           max_targets_per_example=self.max_targets, logit_lens="last",
                           progress=False, seed=i, target_cosines=True)
            if keep is not None:
                self._states[i] = keep
            for space, values in zip(cosines, tr.extra["target_cosines"]):
                space.extend(values)
            n = tr.timing["targets"]
            dev = [d * n for d in tr.deviations]
            dev_sum = dev if dev_sum is None else [a + b for a, b in zip(dev_sum, dev)]
            loss_sum += tr.spaces[-1]["logit_lens_ce"] * n
            targets += n
        deviation = [d / targets for d in dev_sum]
        if start:   # spaces 1..start-1 passed the input through: theirs are the stored read's
            deviation[1:start] = self._last[0][1:start]
            cosines[1:start] = self._last[1][1:start]
        self._boundary = cut
        self._last = (deviation, cosines)
        return {"deviation": deviation, "cosines": cosines, "loss": loss_sum / targets,
                "targets": targets, "seconds": time.perf_counter() - began, "from_layer": start}
