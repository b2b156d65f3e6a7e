"""Data: built-in datasets, user files, and the task formats that turn rows into batches.

    ds = load_dataset_spec("rotten-tomatoes")            # or a .csv/.jsonl/.parquet path
    for batch in batches(ds.task, tokenizer, ds.splits["train"][:256], 8, 128):
        ...

See docs/internals.md ("Data") for the contract and docs/datasets.md for the
built-in datasets, their sources and their fixed splits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SalfError
from .builtin import BUILTIN_DATASETS, SPLITS, list_datasets, load_builtin
from .files import FILE_EXTENSIONS, ReadOptions, load_file, load_hub, parse_labels
from .rows import first_rows, make_batches, sample_rows
from .tasks import (IGNORE_INDEX, ClassificationTask, Encoded, SFTTask, batch_task, batches, collate,
                    encode, pad_token_id, task_from_dict)

__all__ = [
    "TaskDataset", "load_dataset_spec", "describe", "sample_hash", "BUILTIN_DATASETS", "list_datasets",
    "ClassificationTask", "SFTTask", "task_from_dict", "encode", "collate", "batches", "batch_task",
    "pad_token_id", "parse_labels", "Encoded", "IGNORE_INDEX", "SPLITS", "first_rows", "sample_rows",
    "make_batches", "ReadOptions",
]


@dataclass
class TaskDataset:
    """A task plus its rows, split into train/validation/test, and where they came from."""

    name: str
    task: ClassificationTask | SFTTask
    splits: dict[str, list[dict]]
    provenance: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.task.kind


def sample_hash(rows) -> str:
    """Short sha256 (16 hex digits) of the rows' canonical JSON: identifies a data sample."""
    blob = json.dumps(list(rows), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _looks_like_path(name: str) -> bool:
    return (Path(name).suffix.lower() in FILE_EXTENSIONS or name.startswith((".", "~"))
            or "\\" in name or name.startswith("/"))


def load_dataset_spec(name_or_path: str, text_col: str | None = None, label_col: str | None = None,
                      prompt_col: str | None = None, response_col: str | None = None,
                      template: str | None = None, labels=None, seed: int = 0) -> TaskDataset:
    """Load a built-in dataset, a local file, or (with `hf:` or an `org/name` id) a hub dataset.

    `labels` is a verbalizer, as a mapping or as `pos=" good",neg=" bad"`.
    For built-ins, `template` and `labels` override the defaults (labels must
    cover the built-in's label set); column options do not apply.
    """
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise SalfError("no dataset given; pass a built-in name or a data file")
    spec = str(name_or_path).strip()
    cols = dict(text_col=text_col, label_col=label_col, prompt_col=prompt_col, response_col=response_col)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise SalfError(f"seed must be an integer, got {seed!r}") from None
    options = ReadOptions(**cols, template=template, labels=labels, seed=seed)  # files and hub
    if spec in BUILTIN_DATASETS and not Path(spec).exists():
        given = [k for k, v in cols.items() if v is not None]
        if given:
            raise SalfError(f"{', '.join(given)} do not apply to the built-in dataset {spec!r}")
        task, splits, provenance = load_builtin(spec, seed=seed)
        task = _override(task, template, labels, spec)
        name = spec
    elif Path(spec).expanduser().exists() or _looks_like_path(spec):
        task, splits, provenance = load_file(spec, options)
        name = Path(spec).name
    elif spec.startswith("hf:") or "/" in spec:
        hub_name = spec[3:] if spec.startswith("hf:") else spec
        task, splits, provenance = load_hub(hub_name, options)
        name = hub_name
    else:
        raise SalfError(f"unknown dataset {spec!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}) "
                        f"and not a file; hub datasets are written hf:NAME or org/name")
    splits = {s: list(splits.get(s, [])) for s in SPLITS}
    provenance = dict(provenance)
    provenance.setdefault("seed", seed)
    provenance["split_sizes"] = {s: len(rows) for s, rows in splits.items()}
    provenance["task"] = task.to_dict()
    return TaskDataset(name=name, task=task, splits=splits, provenance=provenance)


def _override(task, template, labels, name):
    if template is None and labels is None:
        return task
    if isinstance(task, SFTTask):
        if labels is not None:
            raise SalfError(f"labels (a verbalizer) do not apply to the SFT dataset {name!r}")
        return SFTTask(template, task.response_prefix)
    verbalizer = task.verbalizer
    if labels is not None:
        verbalizer = parse_labels(labels)
        if set(verbalizer) != set(task.labels):
            raise SalfError(f"labels for {name!r} must name exactly its labels: {', '.join(task.labels)}")
        verbalizer = {lab: verbalizer[lab] for lab in task.labels}  # keep the built-in's label order
    return ClassificationTask(template or task.template, verbalizer)


def describe(ds: TaskDataset, max_example_chars: int = 600) -> dict:
    """Summary for `salf datasets show` (JSON-serialisable).

    Keys: name, kind, task (one-line summary), task_spec (task.to_dict()),
    splits {split: {"rows": n, "labels": {label: n}}} (labels for classification),
    provenance, example {"prompt", "target"[, "label"]} (the first row, prompt
    shortened in the middle past max_example_chars), lengths per split (chars).
    """
    task = ds.task
    if isinstance(task, ClassificationTask):
        summary = f"classification, {len(task.labels)} labels ({', '.join(task.labels)})"
    else:
        summary = "SFT (prompt -> response)"
    splits: dict = {}
    for s, rows in ds.splits.items():
        splits[s] = {"rows": len(rows)}
        if isinstance(task, ClassificationTask):
            splits[s]["labels"] = {lab: sum(1 for r in rows if r["label"] == lab) for lab in task.labels}
    out: dict = {
        "name": ds.name,
        "kind": task.kind,
        "task": summary,
        "task_spec": task.to_dict(),
        "splits": splits,
        "provenance": dict(ds.provenance),
    }
    sample = next((rows[0] for s in SPLITS for rows in [ds.splits.get(s, [])] if rows), None)
    if sample is not None:
        if isinstance(task, ClassificationTask):
            prompt, target = task.prompt(sample["text"]), task.verbalizer.get(sample["label"], "")
            example = {"label": sample["label"]}
        else:
            prompt, target = task.prompt(sample["prompt"]), task.response(sample["response"])
            example = {}
        if len(prompt) > max_example_chars:
            prompt = prompt[:max_example_chars // 2] + " [...] " + prompt[-max_example_chars // 2:]
        out["example"] = {"prompt": prompt, "target": target, **example}
    lengths = {}
    for s, rows in ds.splits.items():
        if rows:
            key = "text" if isinstance(task, ClassificationTask) else "prompt"
            chars = sorted(len(r[key]) for r in rows)
            lengths[s] = {"median_chars": chars[len(chars) // 2], "max_chars": chars[-1]}
    out["lengths"] = lengths
    return out
