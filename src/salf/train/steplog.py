"""Per-step numbers: wall time and tokens of every optimizer step, and the training log.

`StepLog` times each step (on_step_begin .. on_step_end, CUDA-synced) and appends one
JSON line per logged step to OUT/train_log.jsonl (step, epoch, loss, learning_rate,
grad_norm, step_s, tokens) and one per evaluation (step, eval_*); with `csv=True` the
training rows also go to OUT/train_log.csv. A resume keeps the rows up to its checkpoint.
Under several processes every rank times its own steps and rank 0 writes the log.
See docs/training.md ("What training prints").
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import distributed
from ..io import atomic_write_text

LOG_FILE = "train_log.jsonl"
CSV_FILE = "train_log.csv"
CSV_COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "step_s", "tokens")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _read_rows(path: Path) -> list[dict]:
    """The log's rows; a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _csv_text(rows: list[dict], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(r for r in rows if "loss" in r)
    return buf.getvalue()


class StepLog(TrainerCallback):
    """Times steps and writes the training log; `tokens_seen()` counts the tokens so far."""

    def __init__(self, out_dir, tokens_seen, *, resume_step: int | None = None, csv: bool = False):
        self.path = Path(out_dir) / LOG_FILE
        self.csv_path = Path(out_dir) / CSV_FILE if csv else None
        self.tokens_seen = tokens_seen
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.last_step_s: float | None = None
        self._t0 = None
        self._tok0 = 0
        self.earlier_s = 0.0       # a resumed run's steps before its checkpoint, from the log
        self.writes = distributed.is_main()
        if self.writes:
            self._restart(resume_step)

    def _restart(self, resume_step: int | None) -> None:
        """Keep the rows a resumed run already has (up to its checkpoint); a new run starts empty."""
        kept = [r for r in _read_rows(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        self.earlier_s = sum(r["step_s"] for r in kept if r.get("step_s") is not None)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.csv_path is not None:
            atomic_write_text(self.csv_path, _csv_text(kept, header=True))

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._t0 = time.perf_counter()
        self._tok0 = self.tokens_seen()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return
        _sync()
        self.last_step_s = time.perf_counter() - self._t0
        self.times.append(self.last_step_s)
        self.tokens.append(self.tokens_seen() - self._tok0)
        self._t0 = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not self.writes:
            return
        row = {"step": state.global_step, "epoch": state.epoch}
        if "loss" in logs:
            row.update({k: logs.get(k) for k in ("loss", "learning_rate", "grad_norm")})
            if self.times:
                row.update(step_s=self.times[-1], tokens=self.tokens[-1])
        elif any(k.startswith("eval_") for k in logs):
            row.update(logs)
        else:
            return   # the Trainer's end-of-training summary
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.csv_path is not None and "loss" in row:
            with open(self.csv_path, "a", encoding="utf-8") as f:
                f.write(_csv_text([row], header=False))

    def summary(self) -> dict:
        """Median and mean step time and tokens/s, skipping warm-up steps; `steps_s_total`:
        every step's time over the whole run, a resumed run's earlier steps included."""
        n = len(self.times)
        skip = 2 if n > 4 else (1 if n > 1 else 0)
        times, tokens = self.times[skip:], self.tokens[skip:]
        total = self.earlier_s + sum(self.times)
        if not times:
            return {"steps_timed": 0, "warmup_skipped": skip, "median_step_s": None, "tokens_per_s": None,
                    "steps_s_total": total}
        return {
            "steps_s_total": total,
            "steps_timed": len(times),
            "warmup_skipped": skip,
            "median_step_s": statistics.median(times),
            "mean_step_s": sum(times) / len(times),
            "tokens_per_step": sum(tokens) / len(tokens),
            "tokens_per_s": sum(tokens) / sum(times) if sum(times) > 0 else None,
        }
