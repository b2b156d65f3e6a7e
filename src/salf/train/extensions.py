"""What a `TrainerCallback` passed to `train(callbacks=[...])` may add to a run.

A callback takes part by defining any of these methods (JSON in, JSON out, but tensors):

    state_dict() / load_state_dict(state)  saved into every checkpoint (salf_state.json, staged
                                           with the rest) and handed back before a resume
    tensor_state_dict() /                  tensors saved beside it (salf_tensors.safetensors,
      load_tensor_state_dict(tensors)      {name: tensor}); a checkpoint without them hands {}
    run_settings()                         recorded in run.json; a resume with other settings is refused
    recorded_settings(old)                 what an older run.json's record of them means today
                                           (settings added since take the values they had)
    metrics_section()                      added to metrics.json
    attach(model, prefix_cache, cost)      handed the planned model, its prefix cache (or None)
                                           and the cost model's settings of a step, before training
    moves_cut = True                       it freezes layers while training (DDP then looks
                                           for unused parameters at every step)

each under the callback's key: `callback.salf_key`, or its class name. The Trainer's own
`ExportableState` is not used: on resume it rebuilds a callback from its constructor
arguments, so a callback holding the model, the optimizer or a cache would lose them.
See docs/training.md ("Extending a run").
"""

from __future__ import annotations


def key(callback) -> str:
    return getattr(callback, "salf_key", None) or type(callback).__name__


def _with(callbacks, method: str) -> dict:
    found: dict = {}
    for cb in callbacks:
        if callable(getattr(cb, method, None)):
            if key(cb) in found:
                raise ValueError(f"two callbacks share the key {key(cb)!r}; give one a salf_key")
            found[key(cb)] = cb
    return found


def stateful(callbacks) -> dict:
    """{key: callback} for callbacks with state_dict() and load_state_dict()."""
    return {k: cb for k, cb in _with(callbacks, "state_dict").items()
            if callable(getattr(cb, "load_state_dict", None))}


def with_tensors(callbacks) -> dict:
    """{key: callback} for callbacks with tensor_state_dict() and load_tensor_state_dict()."""
    return {k: cb for k, cb in _with(callbacks, "tensor_state_dict").items()
            if callable(getattr(cb, "load_tensor_state_dict", None))}


def run_settings(callbacks) -> dict:
    """{key: settings} the callbacks add to run.json."""
    return {k: cb.run_settings() for k, cb in _with(callbacks, "run_settings").items()}


def recorded_settings(callbacks, old: dict | None) -> dict | None:
    """An older run.json's callback settings as each callback reads them today, so a setting
    added after the run was written does not refuse its resume."""
    if not isinstance(old, dict):
        return old
    readers = _with(callbacks, "recorded_settings")
    return {k: readers[k].recorded_settings(v) if k in readers and isinstance(v, dict) else v
            for k, v in old.items()}


def metrics_sections(callbacks) -> dict:
    """{key: section} the callbacks add to metrics.json."""
    return {k: cb.metrics_section() for k, cb in _with(callbacks, "metrics_section").items()}


def attach(callbacks, model, prefix_cache, cost_settings: dict) -> None:
    """Hand every callback with an `attach` method the planned model, its prefix cache and
    the cost settings of a step (a moving cut needs all three)."""
    for cb in callbacks:
        if callable(getattr(cb, "attach", None)):
            cb.attach(model, prefix_cache, cost_settings)
