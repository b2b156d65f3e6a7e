"""Baseline layer selectors: simpler rules to compare SALF's cut against (docs/selectors.md).

Every selector is `fn(context: SelectorContext, **params) -> Selection`; look them
up by name in `SELECTORS` or call `run_selector(name, context, **params)`.
Formulas, sources and choices: docs/selectors.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..choices import BASELINE_SELECTORS
from ..errors import SalfError
from .base import Selection, SelectorContext, training_loss
from .gradnorm import layer_grad_norms, select_grad_norm
from .influence import block_influence, select_block_influence, select_block_influence_cut
from .simple import (select_freeze_first_k, select_freeze_half, select_full, select_lora,
                     select_random)
from .spectrum import matrix_snr, select_spectrum, singular_value_snr

# salf.choices.BASELINE_SELECTORS names them, says what each needs and what it picks
SELECTORS: dict[str, Callable[..., Selection]] = {c.name: c.function for c in BASELINE_SELECTORS}

# Selectors that run the model on data (the others read only the layer count or weights).
NEEDS_DATA = frozenset(c.name for c in BASELINE_SELECTORS if "data" in c.needs)


def selector_params(name: str) -> list[str]:
    """The keyword parameters a selector accepts."""
    fn = _lookup(name)
    return [p for p in inspect.signature(fn).parameters if p != "ctx"]


def _lookup(name: str) -> Callable[..., Selection]:
    try:
        return SELECTORS[name]
    except KeyError:
        raise SalfError(f"unknown selector {name!r}; choose from {', '.join(SELECTORS)}") from None


def run_selector(name: str, context: SelectorContext, **params) -> Selection:
    """Run selector `name` on `context`; unknown names or parameters raise SalfError."""
    fn = _lookup(name)
    accepted = selector_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise SalfError(f"selector {name!r} got unknown parameter(s) {', '.join(unknown)}; "
                        f"it accepts: {', '.join(accepted) or 'none'}")
    return fn(context, **params)


__all__ = [
    "NEEDS_DATA", "SELECTORS", "Selection", "SelectorContext", "block_influence",
    "layer_grad_norms", "matrix_snr", "run_selector", "selector_params", "singular_value_snr",
    "training_loss", "select_block_influence", "select_block_influence_cut", "select_freeze_first_k",
    "select_freeze_half", "select_full", "select_grad_norm", "select_lora", "select_random",
    "select_spectrum",
]
