"""Reading a transformers config the same way everywhere (cost model, trace, anatomy).

Families name the same quantity differently (`hidden_size`, `n_embd`,
`d_model`), and multimodal configs keep the language model's settings in a
text sub-config; these two helpers hide both.
"""

from __future__ import annotations


def text_config(config):
    """The language model's config: the text sub-config of a multimodal config, else `config`."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_value(config, *names: str, default=None):
    """The first of `names` that `config` sets to something other than None, else `default`."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default
