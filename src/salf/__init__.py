"""salf — semantic-aware layer freezing for fine-tuning language models.

Pipeline: analyze (trace) -> plan (cut) -> freeze (apply) -> train/evaluate.
"""

__version__ = "0.1.0"
