"""Apply a freeze plan, fine-tune above the cut, audit, evaluate.

    model = apply_plan(model, plan, lora=None, gradient_checkpointing=False)
    metrics = train(model, tokenizer, task, train_rows, eval_rows, plan, "runs/x")
    model, tok = load_trained("runs/x/final", load_base=...)
    evaluate(model, tok, task, rows)

See docs/training.md.
"""

from .audit import Snapshot, compare, snapshot, write_audit
from .evaluate import evaluate, load_trained
from .freeze import (LoraSettings, SalfFreezeCallback, apply_plan, assert_truncated, move_cut, move_cut_back,
                     parameter_counts, untie_head)
from .loop import train

# names used in docs/internals.md
audit_snapshot = snapshot
audit_compare = compare

__all__ = [
    "apply_plan", "assert_truncated", "LoraSettings", "SalfFreezeCallback", "move_cut", "move_cut_back", "untie_head",
    "parameter_counts", "snapshot", "compare", "write_audit", "Snapshot", "audit_snapshot", "audit_compare",
    "train", "evaluate", "load_trained",
]
