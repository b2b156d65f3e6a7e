"""Hand a FreezePlan to another trainer: Axolotl, LLaMA-Factory, or a PEFT LoraConfig.

Spectrum's most liked feature is a YAML you paste into your trainer's config; salf
does the same from a plan. Each format says exactly what the plan says — which
layers train — and nothing is silently widened: a plan a format cannot express
(a non-contiguous set for LLaMA-Factory, a plan with no layer for LoRA) is an error,
not a best effort. A smaller part the format cannot name (a tied head's untied copy,
LLaMA-Factory and a final norm) stays frozen, and a `#` line in the output says so.

How each target library reads these keys, and how the tests check them against it,
is in docs/interop.md.
"""

from __future__ import annotations

import json
import re

from .errors import SalfError
from .plan import FreezePlan

# model_type -> dotted path of the decoder-layer list (parameter-name prefix)
LAYERS_PATHS = {
    **{t: "model.layers" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                    "gemma3_text", "phi3", "phi", "olmo", "olmo2", "granite",
                                    "mixtral", "qwen2_moe", "cohere", "starcoder2")},
    "gpt2": "transformer.h", "falcon": "transformer.h", "bloom": "transformer.h",
    "gptj": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers",
}
# What a plan trains above the decoder layers besides the head (salf.train.freeze: the final
# norm, and OPT's project_out where a size has one), by layers path; phi names its norm apart.
ABOVE_LAYERS = {"model.layers": ("model.norm",), "transformer.h": ("transformer.ln_f",),
                "gpt_neox.layers": ("gpt_neox.final_layer_norm",),
                "model.decoder.layers": ("model.decoder.final_layer_norm",
                                         "model.decoder.project_out")}
ABOVE_LAYERS_BY_TYPE = {"phi": ("model.final_layernorm",)}
# The head's module name; transformers < 5.14 calls GPT-NeoX's embed_out.
HEAD_NAMES = {"gpt_neox": ("lm_head", "embed_out")}
# Linear projections in one decoder layer (transformers 5.x names), the LoRA targets salf's
# own --lora picks (salf.train.freeze.default_target_modules); GPT-2's are Conv1D.
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED_QKV = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
LORA_TARGETS = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                "gemma3_text", "olmo", "olmo2", "granite", "cohere")},
    "qwen2_moe": _LLAMA_LIKE + ("shared_expert_gate",), "mixtral": _LLAMA_LIKE[:4],
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"), "falcon": _FUSED_QKV, "bloom": _FUSED_QKV,
    "gpt_neox": _FUSED_QKV, "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
CONV1D_TYPES = ("gpt2",)
# LLaMA-Factory names extra modules by their last name and matches them as substrings of
# parameter names: only final norms whose name no decoder layer contains can be listed
# ("norm" would unfreeze every layer's norms too). LLaMA-Factory 0.9.5 runs on
# transformers <= 5.6, where GPT-NeoX's head is still embed_out.
LLAMA_FACTORY_NORMS = {"gpt2": "ln_f", "falcon": "ln_f", "bloom": "ln_f", "gptj": "ln_f",
                       "gpt_neox": "final_layer_norm", "phi": "final_layernorm"}
LLAMA_FACTORY_HEADS = {"gpt_neox": "embed_out"}
FORMATS = ("axolotl", "llama-factory", "peft")


def _model_type(plan: FreezePlan) -> str | None:
    return (plan.model or {}).get("model_type")


# A dotted module path (model.layers, transformer.h): it goes into regexes and PEFT's
# layers_pattern, so anything else would write a config that matches nothing or is invalid.
LAYERS_PATH_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def check_layers_path(layers_path: str) -> str:
    if not LAYERS_PATH_RE.fullmatch(layers_path):
        raise SalfError(f"--layers-path must be a dotted module path such as model.layers, "
                        f"got {layers_path!r}")
    return layers_path


def _layers_path(plan: FreezePlan, layers_path: str | None) -> str:
    if layers_path:
        return check_layers_path(layers_path)
    mt = _model_type(plan)
    if mt not in LAYERS_PATHS:
        raise SalfError(f"don't know the layer path of model_type {mt!r}; pass --layers-path "
                        "(e.g. model.layers)")
    return LAYERS_PATHS[mt]


def _head_names(plan: FreezePlan) -> tuple[str, ...]:
    return HEAD_NAMES.get(_model_type(plan), ("lm_head",))


def _untied_copy_of_tied_head(plan: FreezePlan) -> bool:
    """The plan trains a copy of a head whose weight *is* the input embedding: a trainer
    that only toggles requires_grad cannot express it (the copy does not exist yet)."""
    return plan.head == "untied-copy" and plan.tied is True


def _header(plan: FreezePlan) -> list[str]:
    return ["# generated by salf from a FreezePlan: " + plan.describe(),
            f"# policy {plan.policy}: {plan.reason}".rstrip()]


def axolotl_yaml(plan: FreezePlan, layers_path: str | None = None) -> str:
    """`unfrozen_parameters:` patterns (the format Spectrum writes and Axolotl reads).

    Axolotl treats every '.' in a pattern as a literal dot and matches from the start of
    the parameter name (re.match), so `^model.layers.2.` is all of layer 2 and nothing else.
    """
    if plan.is_full:
        raise SalfError("a full fine-tuning plan freezes nothing: no unfrozen_parameters needed")
    path = _layers_path(plan, layers_path)
    notes, patterns = [], [f"^{path}.{i}." for i in plan.trainable_layers()]
    above = ABOVE_LAYERS_BY_TYPE.get(_model_type(plan)) or ABOVE_LAYERS.get(path)
    if above:
        patterns += [f"^{name}." for name in above]
    else:
        notes.append(f"# the final norm also trains in this plan; salf does not know its name "
                     f"beside {path}: add a pattern for it")
    if _untied_copy_of_tied_head(plan):
        notes.append("# the plan trains an untied copy of the tied head; in the model Axolotl "
                     "loads the head is the embedding matrix, so it stays frozen here "
                     "(use --format peft)")
    elif plan.head != "frozen":
        names = _head_names(plan)
        patterns.append("^" + (names[0] if len(names) == 1 else "(" + "|".join(names) + ")") + ".")
    lines = _header(plan) + notes + ["unfrozen_parameters:"] + [f"- {p}" for p in patterns]
    return "\n".join(lines) + "\n"


def llama_factory_yaml(plan: FreezePlan) -> str:
    """LLaMA-Factory freeze mode: train the last N layers (+ extra modules by name)."""
    if plan.is_full:
        return "finetuning_type: full\n"
    if plan.layers is not None:
        raise SalfError("LLaMA-Factory's freeze mode trains the last N layers; this plan trains a "
                        "non-contiguous set — use --format axolotl")
    mt = _model_type(plan)
    n = plan.num_layers - plan.eof
    notes, extra = [], []
    if mt in LLAMA_FACTORY_NORMS:
        extra.append(LLAMA_FACTORY_NORMS[mt])
    else:
        what = "the final norm and, where a size has one, project_out" if mt == "opt" else \
            "the final norm"
        notes.append(f"# not trained here: {what} (LLaMA-Factory cannot name the norm "
                     "without also unfreezing every layer's norms)")
    if _untied_copy_of_tied_head(plan):
        if n == 0:
            raise SalfError("this plan trains only an untied copy of the tied head, which "
                            "LLaMA-Factory's freeze mode cannot do; use --format peft")
        notes.append("# the plan trains an untied copy of the tied head; LLaMA-Factory's freeze "
                     "mode cannot, so the head stays frozen here (use --format peft)")
    elif plan.head != "frozen":
        extra.append(LLAMA_FACTORY_HEADS.get(mt, "lm_head"))
    # freeze_trainable_layers > 0 means the last n layers (< 0: the first n); 0 means none
    lines = _header(plan) + notes + ["finetuning_type: freeze", f"freeze_trainable_layers: {n}",
                                     "freeze_trainable_modules: all"]
    if extra:
        lines.append("freeze_extra_modules: " + ",".join(extra))
    return "\n".join(lines) + "\n"


def peft_lora_config(plan: FreezePlan, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                     target_modules: list[str] | None = None,
                     layers_path: str | None = None) -> str:
    """A LoraConfig (JSON, `LoraConfig(**json.loads(text))`) restricted to the plan's layers.

    The same adapters salf's own `--lora` puts on the model: every linear projection of the
    trainable layers, and a trainable copy of the head (modules_to_save) when the plan
    trains the head.
    """
    if plan.is_full:
        raise SalfError("a full fine-tuning plan has no cut: use LoRA on all layers directly")
    layers = plan.trainable_layers()
    if not layers:
        # PEFT reads an empty layers_to_transform as "every layer"
        raise SalfError(f"this plan trains no decoder layer (eof {plan.eof} of {plan.num_layers}), "
                        "so there is nothing to put LoRA adapters on")
    mt = _model_type(plan)
    if target_modules is None:
        if mt not in LORA_TARGETS:
            raise SalfError(f"don't know the linear projections of model_type {mt!r} for LoRA; "
                            "call salf.export.peft_lora_config(plan, target_modules=[...])")
        target_modules = sorted(LORA_TARGETS[mt])
    # target_modules is a list, never a regex string: PEFT rejects layers_to_transform then
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
           "lora_dropout": dropout, "target_modules": list(target_modules),
           "layers_to_transform": layers,
           "layers_pattern": _layers_path(plan, layers_path).rsplit(".", 1)[-1], "bias": "none",
           "fan_in_fan_out": mt in CONV1D_TYPES,
           "modules_to_save": list(_head_names(plan)) if plan.head != "frozen" else None}
    return json.dumps(cfg, indent=2) + "\n"


def export_plan(plan: FreezePlan, fmt: str, layers_path: str | None = None) -> str:
    if fmt == "axolotl":
        return axolotl_yaml(plan, layers_path)
    if fmt == "llama-factory":
        return llama_factory_yaml(plan)
    if fmt == "peft":
        return peft_lora_config(plan, layers_path=layers_path)
    raise SalfError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
