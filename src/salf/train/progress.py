"""What a person sees while `train` runs: one bar per phase, short lines, silent saves.

    say(text)        print one line on stderr without breaking a progress bar
                     (e.g. "step 40: cut moved 4 -> 12")
    quiet_saves()    no "Writing model shards" bar while a checkpoint or final/ is written
    ProgressBars     the training bar (postfix: loss, s/step, lr) and one line per evaluation

Per-step numbers go to OUT/train_log.jsonl (salf.train.steplog), not to the console.
See docs/training.md ("What training prints").
"""

from __future__ import annotations

import contextlib
import sys

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging


def say(text: str) -> None:
    """One line on stderr, printed above any progress bar (tqdm.write); under several
    processes only rank 0 speaks (the others would repeat it)."""
    from .. import distributed

    if distributed.is_main():
        tqdm.write(text, file=sys.stderr)


@contextlib.contextmanager
def quiet_saves():
    """Switch transformers' progress bars off for the block (save_pretrained's
    "Writing model shards"), and back on only if they were on."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class ProgressBars(TrainerCallback):
    """The training bar; `step_log` (a StepLog) supplies the last step's wall time.
    The evaluation bar is evaluate_examples(progress=True)'s own."""

    def __init__(self, step_log):
        self.step_log = step_log
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.bar is not None and "loss" in logs:
            postfix = f"loss {logs['loss']:.4f}"
            if self.step_log.last_step_s is not None:
                postfix += f", {self.step_log.last_step_s:.3g} s/step"
            if "learning_rate" in logs:
                postfix += f", lr {logs['learning_rate']:.2e}"
            self.bar.set_postfix_str(postfix)   # on_step_end drew the step; this adds its loss
        evals = {k[5:]: v for k, v in logs.items() if k.startswith("eval_") and k != "eval_runtime"}
        if evals:
            say(f"step {state.global_step}: eval " + ", ".join(f"{k} {_number(v)}" for k, v in evals.items()))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
