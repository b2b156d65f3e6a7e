"""Evaluation, and the loss definitions shared with training.

Classification (left-padded batches, target at position -1): the model runs
with `logits_to_keep=1`, so the unembedding is applied at the label position
only. Reported:

* `accuracy`, `macro_f1` — argmax over the verbalizer's label-token logits
  (macro-F1 over the labels present in gold or predictions, as scikit-learn);
* `loss` — mean CE of the label token under the full vocabulary (exactly the
  training "label" loss);
* `label_loss` — CE restricted to the label set.

SFT (right-padded, labels -100 outside the response): `loss` = mean CE per
response token (the logits are computed only at positions that predict a
response token), `perplexity` = exp(loss).

Left-padded batches get `position_ids` counted from the first real token, so
absolute-position models (GPT-2, OPT) see the same positions as without
padding.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SalfError
from ..io import read_json
from ..losses import (IGNORE_INDEX, batch_loss, is_classification_batch,  # noqa: F401
                      label_position_logits, lm_loss, model_inputs, response_loss,
                      response_loss_per_example)

META_FILE = "salf.json"


def batch_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


# --------------------------------------------------------------------------- evaluation


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def macro_f1(gold: list[int], pred: list[int]) -> float:
    labels = sorted(set(gold) | set(pred))
    if not labels:
        return 0.0
    scores = []
    for c in labels:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def ratio_standard_error(sums: list[float], counts: list[int]) -> float:
    """Standard error of the token-weighted mean loss sum(s)/sum(c) over independent examples
    (delta method for a ratio estimator): what the test rows alone leave uncertain."""
    n, total_c = len(sums), sum(counts)
    if n < 2 or total_c == 0:
        return 0.0
    mean = sum(sums) / total_c
    resid = sum((s - mean * c) ** 2 for s, c in zip(sums, counts))
    return math.sqrt(resid * n / (n - 1)) / total_c


def _is_classification_task(task) -> bool:
    return getattr(task, "kind", None) == "classification" or hasattr(task, "verbalizer")


@torch.no_grad()
def evaluate_examples(model: nn.Module, task, examples: list[dict], pad_id: int, batch_size: int = 16,
                      label_token_ids: list[int] | None = None, progress: bool = False) -> dict:
    """Evaluate already-encoded examples (see `evaluate`)."""
    from ..data import collate

    if not examples:
        raise SalfError("nothing to evaluate: no examples")
    was_training = model.training
    model.eval()
    device = _device(model)
    chunks = range(0, len(examples), int(batch_size))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="evaluate", unit="batch", leave=False)
    try:
        if _is_classification_task(task):
            ids = torch.tensor(label_token_ids, device=device)
            gold, pred, ce, label_ce = [], [], 0.0, 0.0
            for start in chunks:
                batch = collate(examples[start:start + int(batch_size)], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = label_position_logits(model, batch)
                ce += float(F.cross_entropy(logits, batch["target_ids"], reduction="sum"))
                sub = logits[:, ids]
                label_ce += float(F.cross_entropy(sub, batch["label_index"], reduction="sum"))
                gold += batch["label_index"].tolist()
                pred += sub.argmax(-1).tolist()
            n = len(gold)
            return {"accuracy": sum(g == p for g, p in zip(gold, pred)) / n,
                    "macro_f1": macro_f1(gold, pred), "loss": ce / n, "label_loss": label_ce / n,
                    "n": n}
        sums, counts = [], []
        for start in chunks:
            batch = collate(examples[start:start + int(batch_size)], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            s, c = response_loss_per_example(model, batch)
            sums += s
            counts += c
        total, count = sum(sums), sum(counts)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "n": len(examples),
                "tokens": count, "loss_se": ratio_standard_error(sums, counts)}
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, tokenizer, task, rows, batch_size: int = 16, max_length: int = 128,
             progress: bool = False) -> dict:
    """Evaluate `model` on `rows` of `task` (no grad, eval mode; training mode restored after).

    Classification -> {"accuracy", "macro_f1", "loss", "label_loss", "n"};
    SFT -> {"loss", "perplexity", "n", "tokens", "loss_se"} (loss_se: standard error of the
    mean loss over the test rows).
    """
    from ..data import encode, pad_token_id

    examples = encode(task, tokenizer, rows, max_length)
    label_ids = task.label_token_ids(tokenizer) if _is_classification_task(task) else None
    return evaluate_examples(model, task, examples, pad_token_id(tokenizer), batch_size,
                             label_token_ids=label_ids, progress=progress)


# --------------------------------------------------------------------------- reloading


def read_meta(folder: str | os.PathLike) -> dict:
    """The folder's salf.json ({} when it has none); a malformed one is one SalfError."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return {}
    meta = read_json(path, "trained-model metadata")
    if not isinstance(meta, dict):
        raise SalfError(f"trained-model metadata {path}: expected a JSON object, got "
                        f"{type(meta).__name__}")
    return meta


def _check_weights(folder: Path, adapter: bool) -> None:
    """A saved model needs its weights file(s); say so before transformers/PEFT guess a hub id."""
    patterns = (("adapter_model.safetensors", "adapter_model.bin") if adapter
                else ("*.safetensors", "pytorch_model*.bin"))
    if not any(any(folder.glob(p)) for p in patterns):
        what = "LoRA adapter weights (adapter_model" if adapter else "model weights (model"
        raise SalfError(f"{folder} has no {what}.safetensors): the run that wrote it did not "
                        "finish saving, or the file was removed")


def _load_saved(folder: Path, what: str, load):
    """`load()`, with unreadable files (truncated weights, broken JSON) as one SalfError."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SalfError(f"{folder}: cannot load the trained {what} ({first})") from None


def load_trained(folder: str | os.PathLike, load_base: Callable | None = None, dtype=None):
    """Load a model saved by `salf.train.train` (its `final/` folder) -> (model, tokenizer).

    A full model is loaded with `from_pretrained`. A LoRA adapter folder
    (adapter_config.json) needs its base: `load_base(spec)` is called with the
    base spec recorded in the folder's `salf.json` (default:
    `salf.models.load_model`), then `PeftModel.from_pretrained(base, folder)`.
    The model comes back in eval mode.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SalfError(f"no trained model at {folder}")
    meta = read_meta(folder)
    tokenizer = None
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = _load_saved(folder, "tokenizer", lambda: AutoTokenizer.from_pretrained(folder))
    if (folder / "adapter_config.json").is_file():
        spec = meta.get("base")
        if spec is None:
            raise SalfError(f"{folder} holds a LoRA adapter but its {META_FILE} names no base model")
        if load_base is None:
            try:
                from ..models import load_model as load_base  # type: ignore[no-redef]
            except ImportError:
                raise SalfError("loading a LoRA adapter needs load_base(spec) -> base model") from None
        _check_weights(folder, adapter=True)
        base = load_base(spec)
        if isinstance(base, tuple):
            if tokenizer is None and len(base) > 1:
                tokenizer = base[1]
            base = base[0]
        from peft import PeftModel

        model = _load_saved(folder, "adapter", lambda: PeftModel.from_pretrained(base, str(folder)))
    else:
        from transformers import AutoModelForCausalLM

        _check_weights(folder, adapter=False)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = _load_saved(folder, "model",
                            lambda: AutoModelForCausalLM.from_pretrained(folder, **kwargs))
    return model.eval(), tokenizer
