"""User data: local .csv/.tsv, .jsonl/.json, .parquet files, a `save_to_disk` folder, or a hub dataset.

A table becomes rows of `{"text", "label"}` (classification: text_col/label_col)
or `{"prompt", "response"}` (SFT: prompt_col/response_col). With no columns
given, the columns `text`+`label` or `prompt`+`response` are used when present.
A `split` column, if there is one, assigns rows to train/validation/test;
otherwise a seeded 80/10/10 split is made (same rule as the built-ins).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SalfError
from .builtin import SPLITS, seeded_order, split_by_fractions
from .tasks import ClassificationTask, SFTTask

FILE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
DEFAULT_CLASSIFICATION_TEMPLATE = "Text: {text}\nLabel:"
DEFAULT_SFT_TEMPLATE = "Question: {prompt}\nAnswer:"
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "eval": "validation", "test": "test",
                 "testing": "test"}


def parse_labels(spec) -> dict[str, str] | None:
    """Verbalizer from a mapping or from a string like `pos=" good",neg=" bad"`.

    Quoted words are taken exactly; an unquoted word gets a leading space
    (`pos=good` means `" good"`).
    """
    if spec is None or spec == "":
        return None
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    if not isinstance(spec, str):
        raise SalfError(f"labels must be a mapping or a string like 'pos=\" good\",neg=\" bad\"', "
                        f"got {type(spec).__name__}")
    item = re.compile(r"""\s*([^=,]+?)\s*=\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^,]*?)\s*(,|$)""")
    out: dict[str, str] = {}
    pos = 0
    while pos < len(spec):
        m = item.match(spec, pos)
        if not m or m.end() == pos:
            raise SalfError(f"cannot parse labels {spec!r} at {spec[pos:]!r}; "
                            "write them as name=\" word\",other=\" word\"")
        name, word = m.group(1), m.group(2)
        if word[:1] in "\"'" and len(word) >= 2 and word[-1] == word[0]:
            word = re.sub(r"\\(.)", r"\1", word[1:-1])
        else:
            word = " " + word.strip()
        if not word.strip():
            raise SalfError(f"label {name!r} has an empty word in {spec!r}")
        if name in out:
            raise SalfError(f"label {name!r} appears twice in {spec!r}")
        out[name] = word
        pos = m.end()
        if m.group(3) == "":
            break
    return out


# ---------------------------------------------------------------------------
# reading tables

def _read_table(path: Path) -> list[dict]:
    ext = path.suffix.lower()
    try:
        if ext in (".csv", ".tsv"):
            import pandas as pd

            try:
                df = pd.read_csv(path, sep="\t" if ext == ".tsv" else ",", dtype=object,
                                 keep_default_na=False, na_values=[""])
            except pd.errors.EmptyDataError:
                return []
            return df.to_dict("records")
        if ext == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if ext == ".jsonl":
            return _read_jsonl(path)
        if ext == ".json":
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                return []
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                return _read_jsonl(path)  # many ".json" files are JSON lines
            if isinstance(doc, dict):
                lists = [v for v in doc.values() if isinstance(v, list)]
                if len(lists) == 1:
                    doc = lists[0]
                elif doc and all(isinstance(v, list) for v in doc.values()):
                    # column-oriented {"col": [...], ...}
                    n = {len(v) for v in doc.values()}
                    if len(n) != 1:
                        raise SalfError(f"{path}: columns have different lengths")
                    doc = [dict(zip(doc, vals)) for vals in zip(*doc.values())]
                else:
                    doc = [doc]
            if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
                raise SalfError(f"{path}: expected a list of objects (or JSON lines)")
            return doc
    except SalfError:
        raise
    except UnicodeDecodeError as exc:
        raise SalfError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # parser errors from pandas/pyarrow/json
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SalfError(f"cannot read {path}: {first}") from None
    raise SalfError(f"unknown file extension {ext!r} for {path}; use one of {', '.join(FILE_EXTENSIONS)}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SalfError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise SalfError(f"{path}:{n}: expected a JSON object per line")
            rows.append(rec)
    return rows


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# table -> task + splits

def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _as_label(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _label_sort_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _choose_columns(columns: list[str], text_col, label_col, prompt_col, response_col) -> tuple[str, str, str]:
    """('classification'|'sft', col_a, col_b)."""
    cls_given = text_col is not None or label_col is not None
    sft_given = prompt_col is not None or response_col is not None
    if cls_given and sft_given:
        raise SalfError("give either text/label columns (classification) or prompt/response "
                        "columns (SFT), not both")
    if not cls_given and not sft_given:
        if "text" in columns and "label" in columns:
            text_col, label_col, cls_given = "text", "label", True
        elif "prompt" in columns and "response" in columns:
            prompt_col, response_col, sft_given = "prompt", "response", True
        else:
            raise SalfError(f"which columns? pass text/label columns or prompt/response columns; "
                            f"available: {', '.join(columns)}")
    if cls_given:
        kind, a, b = "classification", text_col or "text", label_col or "label"
    else:
        kind, a, b = "sft", prompt_col or "prompt", response_col or "response"
    for col in (a, b):
        if col not in columns:
            raise SalfError(f"column {col!r} not found; available columns: {', '.join(columns)}")
    return kind, a, b


@dataclass(frozen=True)
class ReadOptions:
    """How a table becomes a task and splits: its columns (None: `text`+`label` or
    `prompt`+`response` when present), the prompt template (None: the default of the task's
    kind), the verbalizer `labels` (a mapping or `pos=" good",neg=" bad"`; None: each label
    as its own word), the seed of the 80/10/10 split and the column that gives splits."""

    text_col: str | None = None
    label_col: str | None = None
    prompt_col: str | None = None
    response_col: str | None = None
    template: str | None = None
    labels: object = None
    seed: int = 0
    split_col: str | None = "split"


def build_from_records(records: list[dict], source: str, options: ReadOptions | None = None,
                       presplit: dict[str, str] | None = None):
    """(task, splits, provenance) from a list of records (dicts), read as `options` say.

    `presplit` (record index -> split) is used for hub datasets that come split.
    """
    opts = options if options is not None else ReadOptions()
    if not records:
        raise SalfError(f"{source} has no rows")
    columns: list[str] = []
    for r in records[:1000]:
        columns.extend(c for c in r if c not in columns)
    kind, col_a, col_b = _choose_columns(columns, opts.text_col, opts.label_col, opts.prompt_col,
                                         opts.response_col)
    if presplit is not None:
        split_of = [presplit[i] for i in range(len(records))]
    elif opts.split_col and opts.split_col in columns and opts.split_col not in (col_a, col_b):
        split_of = _given_splits(records, opts.split_col, source)
    else:
        split_of = [None] * len(records)
    rows, where, dropped = _task_rows(records, split_of, kind, (col_a, col_b), source)
    if kind == "classification":
        task = _classification_task(rows, source, opts.template, opts.labels)
    else:
        if opts.labels:
            raise SalfError("labels (a verbalizer) only apply to classification data")
        task = SFTTask(opts.template or DEFAULT_SFT_TEMPLATE)
    splits, method = _assign_splits(rows, where, opts.seed, from_hub=presplit is not None)
    return task, splits, {"rows_dropped_empty": dropped, "seed": opts.seed, "split_method": method}


def _given_splits(records: list[dict], split_col: str, source: str) -> list[str]:
    """Each record's split from its `split_col` value (train/validation/test or an alias)."""
    split_of = []
    for r in records:
        v = r.get(split_col)
        s = SPLIT_ALIASES.get(str(v).strip().lower()) if not _missing(v) else None
        if s is None:
            raise SalfError(f"{source}: split value {v!r} is not one of train/validation/test")
        split_of.append(s)
    return split_of


def _task_rows(records: list[dict], split_of: list, kind: str, cols: tuple[str, str], source: str):
    """(rows, split of each row, rows dropped) of the records whose two columns both hold a value."""
    col_a, col_b = cols
    rows, where, dropped = [], [], 0
    for i, (r, s) in enumerate(zip(records, split_of)):
        a, b = r.get(col_a), r.get(col_b)
        if _missing(a) or _missing(b):
            dropped += 1
            continue
        for col, value in ((col_a, a), (col_b, b)):
            if isinstance(value, (dict, list, tuple)):  # str() would make a label of "{'x': 1}"
                raise SalfError(f"{source}: row {i + 1}, column {col!r} holds a "
                                f"{type(value).__name__} ({str(value)[:40]}), not a text or a label")
        if kind == "classification":
            rows.append({"text": str(a).strip(), "label": _as_label(b)})
        else:
            rows.append({"prompt": str(a).strip(), "response": str(b).strip()})
        where.append(s)
    if not rows:
        raise SalfError(f"{source}: all {len(records)} rows have an empty {col_a!r} or {col_b!r}")
    return rows, where, dropped


def _classification_task(rows: list[dict], source: str, template, labels) -> ClassificationTask:
    """The task of the rows' labels: the given verbalizer (which must cover them), else each
    label as its own word, in label order."""
    found = sorted({r["label"] for r in rows}, key=_label_sort_key)
    verbalizer = parse_labels(labels)
    if verbalizer is None:
        verbalizer = {lab: " " + lab for lab in found}
    else:
        unknown = [lab for lab in found if lab not in verbalizer]
        if unknown:
            raise SalfError(f"label {unknown[0]!r} in {source} is not in the verbalizer; "
                            f"known labels: {', '.join(verbalizer)}")
    if len(verbalizer) < 2:
        raise SalfError(f"{source}: classification needs at least two labels, found only "
                        f"{', '.join(map(repr, found))}")
    return ClassificationTask(template or DEFAULT_CLASSIFICATION_TEMPLATE, verbalizer)


def _assign_splits(rows: list[dict], where: list, seed: int, from_hub: bool) -> tuple[dict, str]:
    """(the rows by split, how they were split): as given (a seeded 10% of train validates
    when no row does and train has 10 or more), else a seeded 80/10/10 split."""
    if not any(s is not None for s in where):
        return (split_by_fractions(rows, seed, DEFAULT_FRACTIONS),
                "sha256(seed, row) order; 80/10/10 train/validation/test")
    splits = {s: [] for s in SPLITS}
    for row, s in zip(rows, where):
        splits[s].append(row)
    method = "given" if not from_hub else "given by the hub dataset"
    if not splits["validation"] and len(splits["train"]) >= 10:
        ordered = seeded_order(splits["train"], seed)
        n_val = max(1, int(round(len(ordered) * 0.1)))
        splits["validation"], splits["train"] = ordered[:n_val], ordered[n_val:]
        method += "; validation = seeded 10% of train"
    return splits, method


def check_saved_dataset(folder: Path, flag: str = "--dataset") -> None:
    """A data folder must be a `datasets` save_to_disk copy (docs/datasets.md)."""
    if not ((folder / "dataset_dict.json").exists() or (folder / "dataset_info.json").exists()):
        raise SalfError(f"{flag} {folder}: a folder without dataset_dict.json or dataset_info.json, "
                        f"so not a `datasets` save_to_disk folder; pass one, or a "
                        f"{'/'.join(FILE_EXTENSIONS)} file")


def load_file(path, options: ReadOptions | None = None):
    """(task, splits, provenance) from a local file or a `datasets.save_to_disk` folder, read
    as `options` (a ReadOptions; None: its defaults) say."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SalfError(f"data file {str(path)!r} not found")
    if p.is_dir():
        check_saved_dataset(p)
        return _load_hf(p, options, from_disk=True)
    if p.suffix.lower() not in FILE_EXTENSIONS:
        raise SalfError(f"unknown file extension {p.suffix!r} for {p}; use one of {', '.join(FILE_EXTENSIONS)}")
    if p.stat().st_size == 0:
        raise SalfError(f"{p} is empty")
    records = _read_table(p)
    if not records:
        raise SalfError(f"{p} has no rows")
    task, splits, info = build_from_records(records, str(p), options)
    provenance = {"source": f"file:{p.resolve()}", "file_sha256": _file_hash(p), **info}
    return task, splits, provenance


def load_hub(name: str, options: ReadOptions | None = None):
    """(task, splits, provenance) from `datasets.load_dataset(name)` (needs the hub), read as
    `options` (a ReadOptions) say."""
    return _load_hf(name, options, from_disk=False)


def _load_hf(name, options: ReadOptions | None, from_disk: bool):
    try:
        import datasets
    except ImportError:
        raise SalfError("loading a hub dataset needs the 'datasets' package") from None
    try:
        if from_disk:
            ds = datasets.load_from_disk(str(name))
        else:
            repo, _, config = str(name).partition(":")
            ds = datasets.load_dataset(repo, config or None)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = "folder" if from_disk else "hub dataset"
        raise SalfError(f"could not load {where} {str(name)!r}: {first}"[:400]) from None
    if isinstance(ds, datasets.Dataset):
        parts = {"train": ds}
    else:
        parts = dict(ds)
    records, presplit, ignored = [], {}, []
    for split_name, part in parts.items():
        s = SPLIT_ALIASES.get(str(split_name).lower())
        if s is None:
            ignored.append(split_name)
            continue
        for rec in part:
            presplit[len(records)] = s
            records.append(dict(rec))
    if not records:
        raise SalfError(f"{name} has no train/validation/test rows (splits: {', '.join(parts)})")
    if all(s == "train" for s in presplit.values()):
        presplit = None  # one unsplit table: use its split column, else the usual seeded split
    task, splits, info = build_from_records(records, str(name), options, presplit=presplit)
    provenance = {"source": f"{'disk' if from_disk else 'hub'}:{name}", **info}
    if ignored:
        provenance["ignored_splits"] = ignored
    return task, splits, provenance


__all__ = ["parse_labels", "load_file", "load_hub", "build_from_records", "ReadOptions", "FILE_EXTENSIONS",
           "DEFAULT_CLASSIFICATION_TEMPLATE", "DEFAULT_SFT_TEMPLATE", "seeded_order"]
