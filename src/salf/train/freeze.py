"""Apply a FreezePlan to a model: freeze below the cut and truly truncate backward.

`apply_plan(model, plan)` leaves embeddings and decoder layers 1..eof
(`layers[:eof]`) without `requires_grad`, trains `layers[eof:]`, the final
norm and (per `plan.head`) the LM head — or, with `lora=LoraSettings(...)`,
wraps the model in a PEFT LoRA adapter on `layers[eof:]` only.

Freezing parameters is not enough for backward to stop at the cut. The traps
this module neutralises (see docs/training.md):

* `enable_input_require_grads()` — called by `activation_checkpointing_enable`
  for every text model and by PEFT whenever checkpointing is on — hooks the
  embedding output to `requires_grad_(True)`, which makes autograd record the
  whole frozen prefix. salf removes any such hook and turns the method into a
  no-op on this model instance.
* Activation checkpointing of frozen layers recomputes them for nothing;
  salf keeps it on trainable layers only and forces `use_reentrant=False`
  (reentrant checkpointing drops the gradients of a layer whose inputs do not
  require grad, which is exactly the first trainable layer after the cut).
* A forward-pre-hook on the first trainable module detaches every tensor input,
  so even a hook installed later cannot carry a graph across the cut.

`assert_truncated(model)` re-checks all of it (the training loop calls it after
the Trainer has set up, because Trainer and PEFT flip things).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import LORA_FIELDS, LoraSettings  # noqa: F401 (re-exported: salf.train.LoraSettings)
from ..errors import SalfError
from ..models.anatomy import Anatomy, anatomy, unwrap  # noqa: F401 (unwrap re-exported)
from ..models.registry import weights_hash
from ..plan import FreezePlan, check_cut

log = logging.getLogger(__name__)

_STATE_ATTR = "_salf_freeze"




@dataclass
class FreezeState:
    """What apply_plan did to a model (kept on the base model as `_salf_freeze`)."""

    plan: Any
    eof: int
    num_layers: int
    head: str
    lora: LoraSettings | None
    gradient_checkpointing: bool
    cut_module: nn.Module | None
    cut_hook: Any = None
    untied: bool = False
    full: bool = False              # plan.train_embeddings: full fine-tuning, no cut
    layer_set: bool = False         # plan.layers: a non-contiguous set above the cut
    trainable_layers: list[int] = field(default_factory=list)   # 0-based, the ones that train
    target_modules: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def freeze_state(model: nn.Module) -> FreezeState | None:
    return getattr(unwrap(model), _STATE_ATTR, None)


def _plan_fields(plan) -> tuple[int, int | None, str, bool]:
    try:
        eof = int(plan.eof)
    except (AttributeError, TypeError, ValueError):
        raise SalfError("plan has no integer `eof`") from None
    num_layers = getattr(plan, "num_layers", None)
    head = getattr(plan, "head", "frozen") or "frozen"
    train_embeddings = bool(getattr(plan, "train_embeddings", False))
    return eof, num_layers, head, train_embeddings


def _detach_tensor(x):
    if isinstance(x, torch.Tensor):
        return x.detach() if x.requires_grad else x
    if isinstance(x, tuple) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in x):
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in x)
    return x


def _salf_cut_hook(_module, args, kwargs):
    """Forward-pre-hook at the cut: nothing computed below it keeps a graph."""
    return tuple(_detach_tensor(a) for a in args), {k: _detach_tensor(v) for k, v in kwargs.items()}


def _noop_enable_input_require_grads(*_args, **_kwargs):
    log.debug("salf: enable_input_require_grads() ignored; backward is truncated at the cut")


def _is_require_grads_hook(fn) -> bool:
    name = getattr(fn, "__name__", "") or getattr(getattr(fn, "func", None), "__name__", "")
    return "require_grad" in name


def _remove_require_grads_hooks(model: nn.Module, anat: Anatomy) -> int:
    """Remove hooks that force the embedding output to require grad; returns how many."""
    removed = 0
    if getattr(model, "_require_grads_hooks", None):
        removed += len(model._require_grads_hooks)
    if hasattr(model, "disable_input_require_grads"):
        type(model).disable_input_require_grads(model)  # the class method, not a patched one
    if "_require_grads_hook" in model.__dict__:
        try:
            model._require_grads_hook.remove()
        except Exception:  # pragma: no cover - already removed
            pass
        del model.__dict__["_require_grads_hook"]
    # PEFT's fallback and older code register the hook on the embedding module directly
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in {id(m): m for m in [*anat.embeddings, *( [emb] if emb is not None else [])]}.values():
        for key, fn in list(module._forward_hooks.items()):
            if _is_require_grads_hook(fn):
                del module._forward_hooks[key]
                removed += 1
    return removed


def _force_non_reentrant(func):
    """A checkpoint function that never runs reentrant (see module docstring)."""
    from torch.utils.checkpoint import checkpoint

    if func is None or func is checkpoint:
        return functools.partial(checkpoint, use_reentrant=False)
    if isinstance(func, functools.partial):
        if func.keywords.get("use_reentrant", None) is not False:
            if func.keywords.get("use_reentrant"):
                log.warning("salf: use_reentrant=True checkpointing cannot train the first layer above a "
                            "frozen cut; using use_reentrant=False")
            return functools.partial(func.func, *func.args, **{**func.keywords, "use_reentrant": False})
        return func
    return functools.partial(func, use_reentrant=False)


def _restrict_checkpointing(model: nn.Module, state: FreezeState, anat: Anatomy) -> None:
    """Checkpointing only on trainable layers, always non-reentrant."""
    for i, layer in enumerate(anat.layers):
        if not hasattr(layer, "gradient_checkpointing"):
            continue
        if i < state.eof:
            layer.gradient_checkpointing = False
        elif layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = _force_non_reentrant(
                getattr(layer, "_gradient_checkpointing_func", None))


def _guarded_set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None,
                                       every_n_layers=1):
    """Bound on a planned model instance in place of `_set_gradient_checkpointing`:
    every later enable (ours, the Trainer's, PEFT's, the user's) keeps frozen
    layers un-checkpointed and checkpointing non-reentrant."""
    from torch.utils.checkpoint import checkpoint

    func = _force_non_reentrant(gradient_checkpointing_func) if enable else (
        gradient_checkpointing_func or checkpoint)
    original = type(self)._set_gradient_checkpointing
    kwargs = {"every_n_layers": every_n_layers} if "every_n_layers" in inspect.signature(original).parameters \
        else {}
    original(self, enable=enable, gradient_checkpointing_func=func, **kwargs)
    state = getattr(self, _STATE_ATTR, None)
    if state is not None:
        _restrict_checkpointing(self, state, anatomy(self))


def untie_head(model: nn.Module, anat: Anatomy | None = None) -> None:
    """Give the LM head its own copy of the (tied) embedding matrix, permanently.

    transformers 5 re-ties from `config.tie_word_embeddings` and the registry
    `all_tied_weights_keys` (computed in `post_init`); both are updated so
    `tie_weights()`, `save_pretrained` and `from_pretrained` keep the copy.
    """
    from transformers import PreTrainedModel

    anat = anat or anatomy(model)
    head = anat.head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for cfg in configs:
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.all_tied_weights_keys = module.get_expanded_tied_weights_keys(all_submodels=True)
    emb = model.get_input_embeddings()
    if head.weight is getattr(emb, "weight", None):  # pragma: no cover - defensive
        raise SalfError("could not untie the LM head from the input embedding")


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise SalfError(f"module {type(target).__name__} not found in model")


def default_target_modules(anat: Anatomy, eof: int) -> tuple[list[str], bool]:
    """Leaf names of every linear projection in layers[eof:] (+ whether any is a GPT-2 Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    names: set[str] = set()
    conv1d = False
    for layer in list(anat.layers)[eof:]:
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and name:
                names.add(name.rsplit(".", 1)[-1])
                conv1d |= isinstance(module, Conv1D)
    if not names:
        raise SalfError("no linear projections found in the trainable layers for LoRA")
    return sorted(names), conv1d


def check_lora_targets(anat: Anatomy, targets: list[str] | None) -> None:
    """LoRA target names must be linear projections of the decoder layers; checked before any
    analysis or training, naming what the model has (PEFT would fail later, less clearly)."""
    if not targets:
        return
    known, _ = default_target_modules(anat, 0)
    paths = {name for name, _ in anat.layers[0].named_modules() if name}
    # PEFT matches a name or a dotted suffix of a module's path (q_proj, self_attn.q_proj)
    unknown = [t for t in targets
               if not any(p == t or p.endswith("." + t) for p in paths) or t.rsplit(".", 1)[-1] not in known]
    if unknown:
        raise SalfError(f"LoRA targets (--lora-targets) {', '.join(unknown)}: not a linear module of "
                        f"the model's decoder layers; they have {', '.join(known)}")


# --------------------------------------------------------------------------- public API


def apply_plan(model: nn.Module, plan, lora: LoraSettings | dict | None = None,
               gradient_checkpointing: bool = False, allow_different_weights: bool = False) -> nn.Module:
    """Freeze `model` per `plan` and truncate backward at the cut.

    `plan` is a FreezePlan or its dict (`json.load` of a plan.json); `lora` a LoraSettings,
    a dict of its fields, or None. As `salf train --plan` does, a plan is refused for a model
    with another layer count, or (an fp32 model) with other weights than the plan records
    (its model.weights_hash) unless `allow_different_weights=True`. Returns the model (the PEFT-wrapped one when
    `lora` is given). The plan is stored as `model.salf_plan`; `assert_truncated(model)`
    re-checks the result.
    """
    plan = _as_plan(plan)
    if isinstance(lora, dict):
        lora = LoraSettings.from_dict(lora)
    elif isinstance(lora, LoraSettings):
        lora.validate()  # its fields may have changed since it was made
    elif lora is not None:
        raise TypeError(f"apply_plan: lora must be a LoraSettings, a dict of its fields "
                        f"({', '.join(LORA_FIELDS)}) or None, got {type(lora).__name__}")
    if freeze_state(model) is not None:
        raise SalfError("a freeze plan is already applied to this model; load a fresh model to apply another")
    anat = anatomy(model)
    if isinstance(plan, FreezePlan):  # the model it records, if any (a hand-built plan may record none)
        # plans are made on fp32 weights; a bf16/fp16 copy of the same weights hashes otherwise,
        # so for those only the layer count is compared
        check_weights = (plan.model.get("weights_hash") and not allow_different_weights
                         and all(p.dtype == torch.float32 for p in model.parameters()))
        plan.check_model({"name_or_path": model.config.name_or_path or "this model",
                          "weights_hash": weights_hash(model) if check_weights else None},
                         anat.num_layers, allow_different_weights, override="allow_different_weights=True")
    state = _checked_state(plan, anat, lora, gradient_checkpointing)
    _set_requires_grad(model, anat, state)
    _neutralise_input_grad_hooks(model, anat)
    _guard_checkpointing(model, anat, state)
    if not state.full:
        _place_cut_hook(anat, state)
    model.__dict__["salf_plan"] = plan
    if lora is None:
        assert_truncated(model)
        return model
    return _wrap_lora(model, anat, state)


def _as_plan(plan, caller: str = "apply_plan"):
    """A FreezePlan from its dict; a FreezePlan (or an object with its fields) as it is."""
    if isinstance(plan, dict):
        return FreezePlan.from_dict(plan, source="plan")
    if not hasattr(plan, "eof"):
        raise TypeError(f"{caller}: plan must be a FreezePlan or its dict (json.load of a "
                        f"plan.json), got {type(plan).__name__}")
    return plan


def _checked_state(plan, anat: Anatomy, lora: LoraSettings | None,
                   gradient_checkpointing: bool) -> FreezeState:
    """The FreezeState `plan` asks for on this model, or one SalfError saying why it cannot be."""
    L = anat.num_layers
    eof, num_layers, head, train_embeddings = _plan_fields(plan)
    if num_layers is not None and int(num_layers) != L:
        raise SalfError(f"plan is for a {num_layers}-layer model but this model has {L} layers")
    layers = getattr(plan, "layers", None)
    # the plan's own rules (salf.plan.check_cut), here against the model's real head
    check_cut(eof, L, head, tied=anat.tied, train_embeddings=train_embeddings,
              layers=list(layers) if layers is not None else None, context="plan")
    if train_embeddings and lora is not None:
        raise SalfError("train_embeddings means full fine-tuning (eof 0, no LoRA); for LoRA on every "
                        "layer use eof 0 without train_embeddings")
    if lora is not None and eof >= L:
        raise SalfError(f"LoRA needs at least one trainable layer, but eof={eof} freezes all {L}")
    # Optional non-contiguous set above the cut (plan.layers, e.g. Spectrum's pick): the
    # unlisted layers stay frozen but gradients still flow through them down to the cut.
    return FreezeState(plan=plan, eof=eof, num_layers=L, head=head, lora=lora,
                       gradient_checkpointing=gradient_checkpointing, cut_module=None,
                       full=train_embeddings, layer_set=layers is not None,
                       trainable_layers=sorted(layers) if layers is not None else list(range(eof, L)))


def _set_requires_grad(model: nn.Module, anat: Anatomy, state: FreezeState) -> None:
    """Everything off, then the part above the cut on (with LoRA, PEFT adds what trains)."""
    model.requires_grad_(state.full)   # full fine-tuning: everything trains, nothing is cut
    if state.head == "untied-copy" and anat.tied and state.lora is None:
        untie_head(model, anat)
        state.untied = True
    if state.lora is not None:
        return
    for i in state.trainable_layers:
        anat.layers[i].requires_grad_(True)
    for module in [anat.final_norm, *anat.post_norm]:
        if module is not None:
            module.requires_grad_(True)
    if state.head in ("trainable", "untied-copy"):
        anat.head.requires_grad_(True)


def _neutralise_input_grad_hooks(model: nn.Module, anat: Anatomy) -> None:
    """No hook may make the embedding output require grad, now or later."""
    _remove_require_grads_hooks(model, anat)
    model.__dict__["enable_input_require_grads"] = _noop_enable_input_require_grads


def _guard_checkpointing(model: nn.Module, anat: Anatomy, state: FreezeState) -> None:
    """Checkpointing only above the cut, non-reentrant — now and after any later enable."""
    model.__dict__["_set_gradient_checkpointing"] = types.MethodType(_guarded_set_gradient_checkpointing, model)
    model.__dict__[_STATE_ATTR] = state
    if state.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise SalfError(f"{type(model).__name__} does not support activation checkpointing")
        model._set_gradient_checkpointing(enable=True)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    else:
        _restrict_checkpointing(model, state, anat)


def _place_cut_hook(anat: Anatomy, state: FreezeState) -> None:
    """Detach whatever enters the first trainable module (moved there if the cut moves)."""
    if state.cut_hook is not None:
        state.cut_hook.remove()
    L = anat.num_layers
    cut = anat.layers[state.eof] if state.eof < L else (anat.final_norm or anat.head)
    state.cut_module = cut
    state.cut_hook = cut.register_forward_pre_hook(_salf_cut_hook, with_kwargs=True, prepend=True)


def _wrap_lora(model: nn.Module, anat: Anatomy, state: FreezeState) -> nn.Module:
    """LoRA adapters on layers[eof:] only (the listed ones for a layer set); the base stays frozen."""
    from peft import LoraConfig, get_peft_model

    lora = state.lora
    targets, conv1d = default_target_modules(anat, state.eof)
    if lora.target_modules:
        check_lora_targets(anat, lora.target_modules)
        targets = list(lora.target_modules)
    state.target_modules = targets
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        layers_to_transform=state.trainable_layers, layers_pattern=anat.layers_path.rsplit(".", 1)[-1],
        fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM",
        modules_to_save=([_module_name(model, anat.head)]
                         if state.head in ("trainable", "untied-copy") else None),
    )
    with warnings.catch_warnings():
        # a tied head in modules_to_save is exactly what "untied-copy" asks for: an independent copy
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*ensure_weight_tying.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*")
        peft_model = get_peft_model(model, config)
    assert_truncated(peft_model)
    return peft_model


def move_cut(model: nn.Module, new_eof: int, optimizer=None) -> dict:
    """Move the cut of a planned model deeper: freeze decoder layers eof+1..new_eof too.

    The cut moves back only through `move_cut_back`. The newly frozen parameters (base weights, or their LoRA
    adapters) lose requires_grad and their gradient; with `optimizer` (the Trainer's,
    accelerate-wrapped or not) they also leave its parameter groups and their state is
    dropped, so the memory is freed and a checkpoint's optimizer state matches an optimizer
    built afresh from the parameters that still train (how a resumed run rebuilds it). The
    detaching hook moves to the new first trainable module, checkpointing stays on trainable
    layers only, and `assert_truncated` re-checks everything. Returns what was frozen:
    `{"from", "to", "tensors": [names], "params", "optimizer_state_bytes_freed"}`.
    """
    base = unwrap(model)
    state: FreezeState | None = getattr(base, _STATE_ATTR, None)
    if state is None:
        raise SalfError("no freeze plan applied to this model (call apply_plan first)")
    if state.full:
        raise SalfError("full fine-tuning has no cut to move: start from a plan with a cut (eof >= 0)")
    if state.layer_set:
        raise SalfError("a plan with a non-contiguous layer set (plan.layers) cannot move its cut")
    old, L = state.eof, state.num_layers
    if not isinstance(new_eof, int) or isinstance(new_eof, bool) or not old <= new_eof <= L:
        raise SalfError(f"the cut can only move deeper: from eof {old} to an integer in {old}..{L}, "
                        f"got {new_eof!r}")
    check_cut(new_eof, L, state.head, context="cannot move the cut")
    if new_eof == L and state.lora is not None:
        raise SalfError(f"cannot move the cut: LoRA needs a trainable layer, so nothing would train "
                        f"at eof {L}; the deepest cut is {L - 1}")
    anat = anatomy(base)
    newly = {id(p): p for layer in list(anat.layers)[old:new_eof] for p in layer.parameters()
             if p.requires_grad}
    names = [n for n, p in model.named_parameters() if id(p) in newly]
    groups = _group_of(optimizer, newly) if optimizer is not None else {}
    freed = _drop_from_optimizer(optimizer, list(newly.values())) if optimizer is not None else 0
    for p in newly.values():
        p.requires_grad_(False)
        p.grad = None
    _set_cut(base, anat, state, new_eof)
    assert_truncated(model)
    return {"from": old, "to": new_eof, "tensors": names,
            "params": sum(p.numel() for p in newly.values()), "optimizer_state_bytes_freed": freed,
            "groups": {n: groups[id(p)] for n, p in model.named_parameters() if id(p) in groups}}


def move_cut_back(model: nn.Module, new_eof: int, tensors: dict[str, int | None], optimizer=None) -> dict:
    """Undo a move: the tensors `move_cut` froze ({name: optimizer group index it left, as
    its report's "groups" says}) train again from cut `new_eof` up. They get requires_grad
    back and rejoin their optimizer group with fresh state (AdamW starts their moments anew),
    placed in the model's order, as an optimizer built afresh would hold them (so that a
    checkpoint's optimizer state maps onto a resumed run's). The hook and checkpointing move
    with the cut; `assert_truncated` re-checks."""
    base = unwrap(model)
    state: FreezeState | None = getattr(base, _STATE_ATTR, None)
    if state is None or state.full or state.layer_set:
        raise SalfError("only a contiguous cut applied by apply_plan can move back")
    anat = anatomy(base)
    if not isinstance(new_eof, int) or not 0 <= new_eof < state.eof:
        raise SalfError(f"moving the cut back: from eof {state.eof} to an integer in 0..{state.eof - 1}, "
                        f"got {new_eof!r}")
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise SalfError(f"moving the cut back: no such tensors in the model: {', '.join(unknown[:3])}")
    layers = {id(p) for layer in list(anat.layers)[new_eof:state.eof] for p in layer.parameters()}
    outside = [n for n in tensors if id(params[n]) not in layers]
    if outside:
        raise SalfError(f"moving the cut back to {new_eof}: {outside[0]} is not in decoder layers "
                        f"{new_eof + 1}..{state.eof}")
    old = state.eof
    for name in tensors:
        params[name].requires_grad_(True)
    if optimizer is not None:
        _rejoin_optimizer(optimizer, model, {n: params[n] for n in tensors}, tensors)
    _set_cut(base, anat, state, new_eof)
    assert_truncated(model)
    return {"from": old, "to": new_eof, "tensors": sorted(tensors),
            "params": sum(params[n].numel() for n in tensors)}


def _set_cut(base: nn.Module, anat: Anatomy, state: FreezeState, eof: int) -> None:
    state.eof = eof
    state.trainable_layers = list(range(eof, state.num_layers))
    _place_cut_hook(anat, state)
    _restrict_checkpointing(base, state, anat)


def _group_of(optimizer, params: dict[int, torch.Tensor]) -> dict[int, int]:
    inner = getattr(optimizer, "optimizer", optimizer)
    return {id(p): i for i, group in enumerate(inner.param_groups) for p in group["params"] if id(p) in params}


def _rejoin_optimizer(optimizer, model: nn.Module, params: dict[str, torch.Tensor],
                      groups: dict[str, int | None]) -> None:
    """Put `params` back into their groups (no state: fresh moments), every group in the
    model's parameter order."""
    inner = getattr(optimizer, "optimizer", optimizer)
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    for name, p in params.items():
        index = groups.get(name)
        if index is None or not 0 <= index < len(inner.param_groups):
            raise SalfError(f"moving the cut back: {name} has no optimizer group to rejoin")
        group = inner.param_groups[index]
        if all(q is not p for q in group["params"]):
            group["params"].append(p)
    for group in inner.param_groups:
        group["params"].sort(key=lambda q: order.get(id(q), len(order)))


def _drop_from_optimizer(optimizer, params: list[torch.Tensor]) -> int:
    """Remove `params` from the optimizer's groups and state; returns the state bytes freed."""
    inner = getattr(optimizer, "optimizer", optimizer)   # accelerate's AcceleratedOptimizer wraps one
    ids = {id(p) for p in params}
    for group in inner.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    freed = 0
    for p in params:
        for value in inner.state.pop(p, {}).values():
            if isinstance(value, torch.Tensor):
                freed += value.numel() * value.element_size()
    return freed


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state (AdamW: two moments per parameter)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def assert_truncated(model: nn.Module) -> dict:
    """Re-check that backward stops at the cut; raise SalfError listing every violation.

    Returns a small report (counts) when everything holds.
    """
    base = unwrap(model)
    state: FreezeState | None = getattr(base, _STATE_ATTR, None)
    if state is None:
        raise SalfError("no freeze plan applied to this model (call apply_plan first)")
    anat = anatomy(base)
    problems = _frozen_weight_problems(model, base, anat, state)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        problems.append("nothing is trainable")
    problems += _input_grad_hook_problems(base, anat)
    problems += _checkpointing_problems(anat, state)
    if state.full:
        problems += [f"{n} does not require grad under full fine-tuning"
                     for n, p in model.named_parameters() if not p.requires_grad][:3]
    elif state.cut_module is None or state.cut_hook is None or \
            state.cut_hook.id not in state.cut_module._forward_pre_hooks:
        problems.append("the detach hook at the cut is missing")

    if problems:
        raise SalfError("backward is not truncated at the cut: " + "; ".join(problems[:8])
                        + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"eof": state.eof, "trainable_tensors": len(trainable), "trainable_params": n_train}


def _frozen_weight_problems(model: nn.Module, base: nn.Module, anat: Anatomy, state: FreezeState) -> list[str]:
    """Weights the plan freezes that require grad: below the cut, a frozen head, base weights
    under LoRA; and an untied head that shares the input embedding again."""
    problems: list[str] = []
    below = {} if state.full else {id(p): "embeddings" for m in anat.embeddings for p in m.parameters()}
    for i, layer in enumerate(list(anat.layers)[: state.eof]):
        for p in layer.parameters():
            below[id(p)] = f"layer {i + 1}"
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in below and p.requires_grad:
            problems.append(f"{n} ({below[id(p)]}, below the cut) requires grad")

    head_weight = getattr(anat.head, "weight", None)
    if state.head == "frozen" and not state.full:
        original_head = getattr(anat.head, "original_module", anat.head)
        for p in original_head.parameters():
            if p.requires_grad:
                problems.append(f"{names.get(id(p), 'head')} (head, plan says frozen) requires grad")
    if state.untied and head_weight is getattr(base.get_input_embeddings(), "weight", None):
        problems.append("the head was untied but shares the input embedding again")

    if state.lora is not None:
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_" not in n and "modules_to_save" not in n:
                problems.append(f"{n} is a base weight but requires grad under LoRA")
    return problems


def _input_grad_hook_problems(base: nn.Module, anat: Anatomy) -> list[str]:
    """An enable_input_require_grads hook makes the embedding output require grad, so autograd
    records the whole frozen prefix: none may be installed, and the method stays a no-op."""
    problems: list[str] = []
    emb = base.get_input_embeddings()
    if getattr(base, "_require_grads_hooks", None) or "_require_grads_hook" in base.__dict__:
        problems.append("an enable_input_require_grads hook is installed")
    for m in {id(m): m for m in [*anat.embeddings, emb] if m is not None}.values():
        if any(_is_require_grads_hook(fn) for fn in m._forward_hooks.values()):
            problems.append(f"a require-grads forward hook sits on {type(m).__name__}")
    if base.__dict__.get("enable_input_require_grads") is not _noop_enable_input_require_grads:
        problems.append("enable_input_require_grads is no longer neutralised")
    return problems


def _checkpointing_problems(anat: Anatomy, state: FreezeState) -> list[str]:
    """Frozen layers are not activation-checkpointed (recomputed for nothing), trainable ones
    only non-reentrantly (reentrant checkpointing drops the gradients of the first trainable
    layer, whose inputs do not require grad)."""
    problems: list[str] = []
    for i, layer in enumerate(anat.layers):
        gc = getattr(layer, "gradient_checkpointing", False)
        if gc and i < state.eof:
            problems.append(f"layer {i + 1} is frozen but activation-checkpointed")
        if gc and i >= state.eof:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if not (isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is False):
                problems.append(f"layer {i + 1} uses reentrant checkpointing")
    return problems


def parameter_counts(model: nn.Module) -> dict:
    """Trainable and total parameter counts (tied weights counted once)."""
    params = list(model.parameters())  # deduplicated by identity
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params)}


def _check_grads_truncated(model: nn.Module) -> list[str]:
    """Names of parameters below the cut that received a gradient (should be none)."""
    base = unwrap(model)
    state = getattr(base, _STATE_ATTR, None)
    if state is None or state.full:
        return []
    anat = anatomy(base)
    below = {id(p) for m in anat.embeddings for p in m.parameters()}
    for layer in list(anat.layers)[: state.eof]:
        below.update(id(p) for p in layer.parameters())
    if state.head == "frozen":
        below.update(id(p) for p in getattr(anat.head, "original_module", anat.head).parameters())
    return [n for n, p in model.named_parameters() if id(p) in below and p.grad is not None]


try:
    from transformers import TrainerCallback as _TrainerCallback
except Exception:  # pragma: no cover - transformers always present in practice
    _TrainerCallback = object


class SalfFreezeCallback(_TrainerCallback):
    """Apply (or re-verify) a plan from inside someone else's `Trainer` code.

    The supported path is `apply_plan` *before* building the Trainer: the
    optimizer is created before `on_train_begin`, so a plan applied here can
    only freeze (the optimizer then skips the frozen parameters, which receive
    no gradient). LoRA and an untied head copy add parameters and therefore
    must be applied before the Trainer exists; this callback refuses them.

    At `on_train_begin` it applies the plan if the model has none yet, then runs
    `assert_truncated`; before the first optimizer step it checks that no
    parameter below the cut received a gradient.
    """

    def __init__(self, plan=None, gradient_checkpointing: bool | None = None):
        self.plan = None if plan is None else _as_plan(plan, "SalfFreezeCallback")
        self.gradient_checkpointing = gradient_checkpointing
        self._checked_grads = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if freeze_state(model) is None:
            if self.plan is None:
                raise SalfError("SalfFreezeCallback has no plan and the model has none applied")
            anat = anatomy(unwrap(model))
            head = getattr(self.plan, "head", "frozen")
            if head == "untied-copy" and anat.tied:
                raise SalfError("an untied head copy adds a parameter the Trainer's optimizer does not know; "
                                "call salf.train.apply_plan before creating the Trainer")
            gc = self.gradient_checkpointing
            if gc is None:
                gc = any(getattr(layer, "gradient_checkpointing", False) for layer in anat.layers)
            apply_plan(model, self.plan, gradient_checkpointing=gc)
        assert_truncated(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._checked_grads or model is None:
            return
        self._checked_grads = True
        leaked = _check_grads_truncated(model)
        if leaked:
            raise SalfError(f"parameters below the cut received gradients: {', '.join(leaked[:5])}")
