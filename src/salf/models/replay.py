"""Run a model up to a decoder layer, and replay layers 1..k from a stored output.

The layers below a cut are frozen, so their output for a given input does not change: it
can be computed once and replayed instead of run again. Three readers share these pieces:

- the prefix cache (`salf.train.prefix_cache`) runs the frozen prefix once per training
  example (`run_to_layer`) and keeps layers 1..eof patched for the whole run
  (`PrefixReplay.attach`/`detach`): while a batch is set they replay its cached states;
- the dynamic probe (`salf.dynamic.probe`) keeps the cut's output of every probe batch
  while the trace reads it (`capture_output`) and replays it at the next read
  (`with replay_stored(...)`), inside the prefix cache's patch when both are on;
- the trace (`salf.analysis.trace`) stops the forward after the last decoder layer
  (`run_to_layer`), so neither the final norm over all positions nor the logits run.

`verify_anatomy` reads the last layer's output with `capture_output`.

`layers` is the anatomy's decoder-layer list: `layers[i]` is decoder layer i+1, and
"layers 1..k" are `layers[:k]`. A patch sets the layer instance's `forward` (what
`nn.Module.__call__` runs, its hooks still around it) and puts back whatever was there
before — the class's forward, or another patch — so patches nest when they are taken
off in the reverse order of putting them on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .anatomy import layer_output


class StopForward(Exception):
    """Raised right after a stopping capture's layer ran: nothing after it is needed."""


@dataclass
class LayerOutput:
    """A decoder layer's hidden states (None until the layer ran) and whether the layer
    returns a tuple (a replay must return what the layer returns)."""

    hidden: torch.Tensor | None = None
    as_tuple: bool = False


@contextlib.contextmanager
def capture_output(layer: nn.Module, stop: bool = False, clone: bool = False) -> Iterator[LayerOutput]:
    """Keep `layer`'s output, at each forward inside the block, in the yielded LayerOutput.

    stop: raise StopForward right after the layer (`run_to_layer` catches it). clone: keep a
    detached copy rather than the tensor the next layer receives. The layer's forward hooks
    put on before the block run before this one; with stop, those put on inside it never run."""
    captured = LayerOutput()

    def hook(_module, _args, output):
        hidden = layer_output(output)
        captured.hidden = hidden.detach().clone() if clone else hidden
        captured.as_tuple = isinstance(output, (tuple, list))
        if stop:
            raise StopForward

    handle = layer.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def run_to_layer(model: nn.Module, layer: nn.Module, inputs: dict) -> LayerOutput:
    """`model(**inputs)` up to and including `layer` (one of its decoder layers), which
    returns that layer's output: nothing after the layer runs. Its `hidden` is None if the
    layer never ran. Mode and grad are the caller's (eval, inference_mode)."""
    with capture_output(layer, stop=True) as captured:
        try:
            model(**inputs)
        except StopForward:
            pass
    return captured


class PrefixReplay:
    """Layers 1..cut pass their input through, and layer `cut` returns `replay(hidden)`
    (the stored h^cut; `hidden`, what it receives, gives the device, dtype and layout).

    as_tuple: whether to return `(h,)` as the real layers do — a bool, or a callable read at
    every call (the prefix cache learns it when it first runs the prefix). active: None
    (always replay) or a callable; while it returns False the layers run the forward that
    was there before the patch. `attach()`/`detach()` for a patch that lasts (the prefix
    cache's, for a whole training run), or `with PrefixReplay(...):` for one block."""

    def __init__(self, layers, cut: int, replay: Callable[[torch.Tensor], torch.Tensor],
                 as_tuple: bool | Callable[[], bool] = False, active: Callable[[], bool] | None = None):
        self.layers = list(layers[:cut])
        self.replay = replay
        self.as_tuple = as_tuple
        self.active = active
        self._saved: list | None = None   # each layer's instance forward before (None: the class's)

    @property
    def attached(self) -> bool:
        return self._saved is not None

    def attach(self) -> "PrefixReplay":
        if self.attached:
            raise RuntimeError("this PrefixReplay is already attached")
        self._saved = [layer.__dict__.get("forward") for layer in self.layers]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer.forward = self._forward(layer.forward, replays=i == last)
        return self

    def detach(self) -> None:
        """Put back each layer's forward from before `attach` (a no-op when not attached)."""
        if self._saved is None:
            return
        for layer, saved in zip(self.layers, self._saved):
            if saved is None:
                del layer.forward          # back to the class's forward
            else:
                layer.forward = saved      # someone else's patch (e.g. the prefix cache's)
        self._saved = None

    def __enter__(self) -> "PrefixReplay":
        return self.attach()

    def __exit__(self, *_exc) -> None:
        self.detach()

    def _returns_tuple(self) -> bool:
        flag = self.as_tuple
        return bool(flag() if callable(flag) else flag)

    def _forward(self, original, replays: bool):
        def forward(*args, **kwargs):
            if self.active is not None and not self.active():
                return original(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            out = self.replay(hidden) if replays else hidden
            return (out,) if self._returns_tuple() else out

        return forward


def replay_stored(layers, cut: int, stored: LayerOutput) -> PrefixReplay:
    """The patch replaying `stored` (layer `cut`'s output, as `capture_output` kept it),
    moved to the device and dtype of the hidden states layer `cut` receives."""
    state = stored.hidden

    def replay(hidden: torch.Tensor) -> torch.Tensor:
        return state.to(device=hidden.device, dtype=hidden.dtype)

    return PrefixReplay(layers, cut, replay, stored.as_tuple)
