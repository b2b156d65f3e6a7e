"""Model anatomy: the parts of a causal LM that SALF reads and cuts.

For a Hugging Face causal LM, `anatomy(model)` returns the embedding
modules, the ordered decoder layers, the final transform N (final norm, plus
OPT's `project_out` where present), the unembedding W (tied or not) and what
the logits need beyond W·N(h) (bias, final soft-capping, logit scale).

Latent space l (0..L) is the *input* of decoder layer l+1 for l < L and the
output of the last layer for l = L: taking the input of layer 1 (not the
embedding module's output) includes whatever the model adds before the first
layer (positions, Gemma's sqrt(d) scaling, dropout).

Every family is resolved from an explicit table of attribute paths. A model
whose class matches none of them fails with `SalfError` naming the class and
the missing part — salf never guesses where the layers are. `verify_anatomy`
additionally recomputes logits from the parts and compares them with the
model's own (tests run it for every family; `salf analyze` runs it once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SalfError
from .config import config_value, text_config

# Per family: (base-model attribute, embedding attrs, layers attr, final-norm attr,
# extra modules applied after the norm). Checked in order; first full match wins.
_FAMILIES: list[tuple[str, tuple[str, ...], str, str, tuple[str, ...]]] = [
    # Llama, Mistral, Qwen2/3, Gemma 1/2/3 (text), Phi-3, SmolLM, OLMo, Granite ...
    ("model", ("embed_tokens",), "layers", "norm", ()),
    # Phi (phi-1/2)
    ("model", ("embed_tokens",), "layers", "final_layernorm", ()),
    # GPT-2, Falcon, BLOOM, GPT-J
    ("transformer", ("wte", "wpe"), "h", "ln_f", ()),
    ("transformer", ("word_embeddings", "word_embeddings_layernorm"), "h", "ln_f", ()),
    # GPT-NeoX / Pythia
    ("gpt_neox", ("embed_in",), "layers", "final_layer_norm", ()),
    # OPT (project_in/out exist on some sizes, e.g. opt-350m)
    ("model.decoder", ("embed_tokens", "embed_positions", "project_in"), "layers",
     "final_layer_norm", ("project_out",)),
]


def _get(obj: object, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class Anatomy:
    """The parts of one causal LM, by reference (no copies)."""

    model: nn.Module
    base_path: str                  # e.g. "model" or "transformer"
    layers_attr: str                # attribute of the base holding the ModuleList
    embeddings: list[nn.Module]     # everything that runs before decoder layer 1
    layers: nn.ModuleList
    final_norm: nn.Module | None
    post_norm: list[nn.Module]      # applied after the final norm (OPT project_out)
    head: nn.Module                 # the output-embedding module (lm_head / embed_out)
    tied: bool                      # head weight is the input embedding matrix
    logit_softcap: float | None = None
    logit_scale: float | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def unembedding(self) -> torch.Tensor:
        """W, shape (V, d): logits = W · N(h) (+ bias)."""
        return self.head.weight

    @property
    def layers_path(self) -> str:
        """Dotted path of the decoder-layer list inside the model (PEFT's layers_pattern)."""
        return f"{self.base_path}.{self.layers_attr}"

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """N(h): the final norm (and post-norm projections), as the logit lens applies it."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        for module in self.post_norm:
            h = module(h)
        return h

    def logits_from_normed(self, t: torch.Tensor) -> torch.Tensor:
        """Logits from a normalised latent t = N(h), exactly as the model computes them."""
        z = self.head(t.to(self.head.weight.dtype))
        if self.logit_scale is not None:
            z = z * self.logit_scale
        if self.logit_softcap is not None:
            z = torch.tanh(z / self.logit_softcap) * self.logit_softcap
        return z


def anatomy(model: nn.Module) -> Anatomy:
    """Resolve the anatomy of a Hugging Face causal LM (raises SalfError if unknown)."""
    cls = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise SalfError(f"unsupported architecture {cls}: no output embedding (lm_head) found; "
                        "salf needs a causal LM with an unembedding matrix")
    config = getattr(model, "config", None)
    n_layers = config_value(config, "num_hidden_layers", "n_layer")
    for base_path, emb_attrs, layers_attr, norm_attr, post_attrs in _FAMILIES:
        base = _get(model, base_path)
        if base is None:
            continue
        layers = getattr(base, layers_attr, None)
        norm = getattr(base, norm_attr, None)
        if not isinstance(layers, nn.ModuleList) or norm is None or emb_attrs[0] not in dir(base):
            continue
        if getattr(base, emb_attrs[0], None) is None:
            continue
        if n_layers is not None and len(layers) != n_layers:
            raise SalfError(f"unsupported architecture {cls}: found {len(layers)} layers at "
                            f"{base_path}.{layers_attr} but config says {n_layers}")
        embeddings = [m for m in (getattr(base, a, None) for a in emb_attrs) if m is not None]
        post = [m for m in (getattr(base, a, None) for a in post_attrs) if m is not None]
        input_emb = model.get_input_embeddings()
        tied = input_emb is not None and head.weight is getattr(input_emb, "weight", None)
        text_cfg = text_config(config)
        return Anatomy(
            model=model, base_path=base_path, layers_attr=layers_attr, embeddings=embeddings,
            layers=layers, final_norm=norm, post_norm=post, head=head, tied=tied,
            logit_softcap=getattr(text_cfg, "final_logit_softcapping", None),
            logit_scale=getattr(text_cfg, "logit_scale", None),
        )
    raise SalfError(f"unsupported architecture {cls} (model_type="
                    f"{getattr(config, 'model_type', '?')}): could not find decoder layers and a "
                    "final norm at any known location; see docs/architectures.md to add one")


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PeftModel / DDP wrapper (or the model itself)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) \
            and not hasattr(model, "config"):
        model = model.module
    get_base = getattr(type(model), "get_base_model", None)
    if get_base is not None:
        model = model.get_base_model()
    return model


def layer_output(output) -> torch.Tensor:
    """Hidden states from a decoder layer's return value (tensor or tuple, by version)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def verify_anatomy(anat: Anatomy, input_ids: torch.Tensor, atol: float = 1e-4) -> float:
    """Recompute last-position logits from the parts; raise SalfError on mismatch.

    Returns the max absolute difference. Catches an architecture whose parts
    resolved but whose logits are computed differently (an extra scale, a bias).
    """
    from .replay import capture_output   # here: replay.py imports layer_output from this module

    with capture_output(anat.layers[-1]) as last:
        out = anat.model(input_ids=input_ids, use_cache=False)
    theirs = out.logits[:, -1]
    if not torch.isfinite(theirs).all():
        raise SalfError(f"{type(anat.model).__name__} produces NaN/inf logits: the weights are "
                        "broken (a bad checkpoint or conversion?)")
    ours = anat.logits_from_normed(anat.normalize(last.hidden[:, -1]))
    diff = (ours.float() - theirs.float()).abs().max().item()
    scale = max(1.0, theirs.float().abs().max().item())
    if not diff <= atol * scale:
        raise SalfError(f"anatomy check failed for {type(anat.model).__name__}: logits recomputed "
                        f"from layers/norm/head differ from the model's by {diff:.3g}")
    return diff
