"""Model resolution (built-in, local folder, hub id), anatomy of each family, tiny test models."""

from .anatomy import Anatomy, anatomy, layer_output, verify_anatomy
from .registry import (BUILTIN_MODELS, DEFAULT_MODEL, ModelInfo, list_models, load_model,
                       prepare_builtin, weights_hash)
from .tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer

__all__ = ["Anatomy", "anatomy", "layer_output", "verify_anatomy", "BUILTIN_MODELS",
           "DEFAULT_MODEL", "ModelInfo", "list_models", "load_model", "prepare_builtin",
           "weights_hash", "TINY_FAMILIES", "tiny_model", "tiny_tokenizer"]
