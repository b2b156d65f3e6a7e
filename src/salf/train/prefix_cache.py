"""Prefix-activation cache: run the frozen prefix once per training example, then skip it.

With a cut at eof, layers 1..eof are frozen and receive no gradient, so their
output for a given example never changes during training. The first time an
example is trained on, `ensure` runs the prefix for its batch (inference mode,
stopping after layer eof: `salf.models.replay.run_to_layer`) and keeps the hidden
states at the example's real tokens. `attach` makes the frozen layers pass-throughs
and the last of them return the cached states for the current batch (re-padded to
the batch's layout; a `salf.models.replay.PrefixReplay` active while a batch is
set): from the second time an example is seen — the second epoch on — a step
costs only the trainable suffix, the embeddings lookup and the head. In a
single pass over the data the prefix runs once per example either way, so the
cache saves nothing there; it pays off with epochs > 1. (`build` fills it for
all examples up front, for benchmarks and repeated runs on the same data.)

When the cut moves deeper during training (dynamic freezing), `move_to(eof)` drops the
cached rows and they are rebuilt lazily at the new boundary, each on its next step: a row
costs one more run of the (now longer) frozen prefix after each move. A cut at 0 (nothing
frozen yet) caches nothing until it moves.

Differences from running the prefix: the prefix runs in eval mode (no dropout
in frozen layers; Llama-family models have none anyway), and in the dtype of the
cache. Evaluation and anything called without `current` set run the real
prefix. Memory: sum of tokens x hidden x bytes (e.g. 2,000 examples x 60 tokens
x 576 x 4 B = 276 MB).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SalfError
from ..losses import model_inputs
from ..models.anatomy import anatomy, unwrap
from ..models.replay import PrefixReplay, run_to_layer


class PrefixCache:
    def __init__(self, model: nn.Module, eof: int, dtype: torch.dtype | None = None):
        if eof < 0:
            raise SalfError(f"the prefix cache needs a cut eof >= 0, got {eof}")
        self.model = model
        self.anat = anatomy(unwrap(model))
        self.eof = eof
        self.dtype = dtype
        self.states: dict[int, torch.Tensor] = {}
        self.current: torch.Tensor | None = None   # example indices of the batch being trained
        self.current_mask: torch.Tensor | None = None
        self._returns_tuple: bool | None = None
        self._patch: PrefixReplay | None = None    # the replay of layers 1..eof while attached

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states.values())

    @torch.inference_mode()
    def _run_prefix(self, batch: dict, indices: list[int]) -> None:
        saved, self.current = self.current, None      # the real prefix runs here
        was_training = self.model.training
        self.model.eval()
        try:
            out = run_to_layer(self.model, self.anat.layers[self.eof - 1],
                               model_inputs(self.model, batch))
        finally:
            self.model.train(was_training)
            self.current = saved
        if out.hidden is None:
            raise SalfError(f"the prefix cache's forward never reached decoder layer {self.eof}")
        self._returns_tuple = out.as_tuple
        h, mask = out.hidden, batch["attention_mask"].bool()
        for row, idx in enumerate(indices):
            kept = h[row][mask[row]]
            self.states[idx] = kept.to(self.dtype or kept.dtype).clone()

    def ensure(self, batch: dict, indices) -> int:
        """Cache the examples of `batch` not cached yet; returns how many were added."""
        indices = [int(i) for i in indices]
        if self.eof == 0 or all(i in self.states for i in indices):
            return 0
        missing = [i for i in indices if i not in self.states]
        self._run_prefix(batch, indices)
        return len(missing)

    def build(self, batches, progress: bool = False) -> "PrefixCache":
        """Fill the cache for every example of `batches` (indices follow the batch order)."""
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="prefix cache", unit="batch", leave=False)
        start = 0
        for batch in batches:
            n = batch["input_ids"].shape[0]
            self._run_prefix(batch, list(range(start, start + n)))
            start += n
        return self

    def _replay(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.current_mask.bool().to(hidden.device)
        out = torch.zeros_like(hidden)
        for row, idx in enumerate(self.current.tolist()):
            out[row][mask[row]] = self.states[idx].to(device=hidden.device, dtype=hidden.dtype)
        return out

    def attach(self) -> "PrefixCache":
        """Make layers 1..eof pass-throughs while `current` is set (the last one replays)."""
        self.detach()
        self._patch = PrefixReplay(self.anat.layers, self.eof, self._replay,
                                   as_tuple=lambda: self._returns_tuple,
                                   active=lambda: self.current is not None).attach()
        return self

    def detach(self) -> None:
        """Give layers 1..eof back the forward they had before `attach`."""
        if self._patch is not None:
            self._patch.detach()
            self._patch = None

    def move_to(self, eof: int) -> "PrefixCache":
        """Follow a cut that moved (deeper, or back by an undo): the cached rows are dropped
        and rebuilt lazily at the new cut."""
        attached = self._patch is not None
        self.detach()
        self.eof = eof
        self.states.clear()
        return self.attach() if attached else self

    def set_batch(self, indices: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        self.current, self.current_mask = indices, attention_mask
