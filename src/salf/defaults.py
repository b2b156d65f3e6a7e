"""Defaults shared by the library and the CLI (kept import-light: `salf --help` reads them).

DEFAULT_POLICY is the cut policy `salf analyze` / `salf finetune` use unless told
otherwise: max-gain-e0, the only rule the sweep measured that never broke quality
(docs/method.md "Sweep verdict", bench/RESULTS.md §4). "max-gain" stays selectable.
"""

DEFAULT_POLICY = "max-gain-e0"

# Analysis examples for `salf analyze` / `salf finetune` (the sweep keeps 256). 64 gave the
# same max-gain-e0 and max-gain picks as 256 on all three built-in datasets (2 sampling
# seeds each) at about 1% of a 120-step full fine-tuning run (bench/RESULTS.md §4).
DEFAULT_ANALYSIS_SAMPLES = 64

# Optimizer steps of `salf finetune` without --max-steps (`salf train` lets --epochs decide).
DEFAULT_FINETUNE_STEPS = 100

# Tokens per example of the library's train() (the CLI's --max-length defaults to 96).
DEFAULT_MAX_LENGTH = 128

# Where training also logs (--report-to): nowhere else, tensorboard, or a CSV.
REPORT_TO = ("none", "tensorboard", "csv")

# Checkpoints `salf train` / `salf finetune` keep (the newest ones; older ones are deleted).
DEFAULT_SAVE_TOTAL_LIMIT = 2


def default_save_steps(max_steps: int | None) -> int:
    """Checkpoint interval without --save-steps: a tenth of --max-steps, at least 10;
    every 200 steps when --epochs decides the length."""
    return max(10, max_steps // 10) if max_steps else 200
