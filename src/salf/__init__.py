"""salf — semantic-aware layer freezing for fine-tuning language models.

Pipeline: analyze (trace) -> plan (cut) -> freeze (apply) -> train/evaluate.

The stable API (docs/api.md) is what `import salf` gives; everything else may change:

    analysis = salf.analyze(model, rows, tokenizer=tok)      # where to cut, on your data
    model = salf.freeze(model, analysis.plan)               # or a plan.json path, or an int cut
    trainer.add_callback(salf.MovingCut(eval_rows, collator=trainer.data_collator))

The names are imported on first use, so `import salf` stays light.
"""

import importlib as _importlib

__version__ = "0.1.0"

# name -> module that defines it (docs/api.md documents each)
_API = {"analyze": "api", "freeze": "api", "MovingCut": "api"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(_importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
