"""Task formats: how a row becomes token ids, and how examples become batches.

Two kinds of task (see docs/internals.md, "Data"):

* `ClassificationTask(template, verbalizer)`: the prompt is
  `template.format(text=row["text"])`; the target is the *first token* of the
  label's word (`" positive"`), predicted at the prompt's last position.
  Batches are **left**-padded so that position is always `-1`.
* `SFTTask(template)`: the prompt is `template.format(prompt=row["prompt"])`,
  followed by `response_prefix + row["response"]` and EOS; only the response
  tokens (and EOS) are labelled. Batches are **right**-padded.

`encode` turns rows into plain examples (lists of ints), `collate` pads a list
of examples into tensors, `batches` does both for an iterable of batches.
"""

from __future__ import annotations

import random
import re
import string
from typing import Iterator

import torch

from ..errors import SalfError

IGNORE_INDEX = -100
# Text used to build a sample prompt when checking how label words tokenize
# after the template's tail.
_PROBE_TEXT = "This is an example."


def _check_template(template: object, field: str, kind: str) -> str:
    if not isinstance(template, str) or not template:
        raise SalfError(f"{kind} template must be a non-empty string containing {{{field}}}")
    try:
        template.format(**{field: "x"})
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except (KeyError, IndexError, ValueError) as exc:
        raise SalfError(f"{kind} template {template!r} cannot be filled with only {{{field}}} "
                        f"({type(exc).__name__}: {exc}); write literal braces as {{{{ and }}}}") from None
    if names.count(field) != 1:
        raise SalfError(f"{kind} template {template!r} must contain {{{field}}} exactly once "
                        f"(found {names.count(field)})")
    return template


def _split_template(template: str, field: str) -> tuple[str, str]:
    """(head, tail) around the first {field}, with the other placeholders filled/escaped."""
    marker = "\x00SALF\x00"
    filled = template.format(**{field: marker})
    head, _, tail = filled.partition(marker)
    return head, tail


class ClassificationTask:
    """Prompt + verbalizer classification; the target is the label word's first token."""

    kind = "classification"

    def __init__(self, template: str, verbalizer: dict[str, str]):
        self.template = _check_template(template, "text", "classification")
        if not isinstance(verbalizer, dict) or not verbalizer:
            raise SalfError("a classification task needs a non-empty verbalizer {label: word}")
        clean: dict[str, str] = {}
        for label, word in verbalizer.items():
            if not isinstance(word, str) or not word.strip():
                raise SalfError(f"label {label!r} has an empty verbalizer word {word!r}")
            clean[str(label)] = word
        self.verbalizer = clean
        self._head, self._tail = _split_template(self.template, "text")

    @property
    def labels(self) -> list[str]:
        """Label names, in verbalizer order (label_index refers to this order)."""
        return list(self.verbalizer)

    def prompt(self, text: str) -> str:
        return self._head + text + self._tail

    def label_index(self, label: object) -> int:
        key = str(label)
        try:
            return self.labels.index(key)
        except ValueError:
            raise SalfError(f"label {key!r} is not in the verbalizer; known labels: "
                            f"{', '.join(self.labels)}") from None

    def label_token_ids(self, tokenizer) -> list[int]:
        """First token id of each label word, in label order.

        The id is the first token the word gets when it follows the prompt,
        which for byte-level BPE tokenizers is `encode(word)[0]` (and for
        sentencepiece tokenizers avoids a spurious lone-space token). Raises
        SalfError when a word encodes to nothing, merges with the prompt's last
        token, or shares its first token with another label.
        """
        probe = self.prompt(_PROBE_TEXT)
        probe_ids = _ids(tokenizer, probe)
        ids: list[int] = []
        for label, word in self.verbalizer.items():
            alone = _ids(tokenizer, word)
            if not alone:
                raise SalfError(f"label word {word!r} (label {label!r}) encodes to no tokens")
            joined = _ids(tokenizer, probe + word)
            if joined[:len(probe_ids)] != probe_ids or len(joined) == len(probe_ids):
                raise SalfError(f"label word {word!r} merges with the prompt's last token; "
                                "start label words with a space or change the template")
            ids.append(joined[len(probe_ids)])
        seen: dict[int, str] = {}
        for (label, word), tid in zip(self.verbalizer.items(), ids):
            if tid in seen:
                other = seen[tid]
                raise SalfError(f"label words {self.verbalizer[other]!r} and {word!r} share their "
                                f"first token ({tokenizer.convert_ids_to_tokens(tid)!r}); "
                                "choose words that start differently")
            seen[tid] = label
        return ids

    def to_dict(self) -> dict:
        return {"kind": self.kind, "template": self.template, "verbalizer": dict(self.verbalizer)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassificationTask":
        return cls(d["template"], d["verbalizer"])

    def __eq__(self, other) -> bool:
        return isinstance(other, ClassificationTask) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ClassificationTask(template={self.template!r}, verbalizer={self.verbalizer!r})"


class SFTTask:
    """Supervised fine-tuning: prompt, then `response_prefix + response` + EOS; loss on the response."""

    kind = "sft"

    def __init__(self, template: str, response_prefix: str = " "):
        self.template = _check_template(template, "prompt", "SFT")
        if not isinstance(response_prefix, str):
            raise SalfError("SFT response_prefix must be a string")
        self.response_prefix = response_prefix
        self._head, self._tail = _split_template(self.template, "prompt")

    def prompt(self, text: str) -> str:
        return self._head + text + self._tail

    def response(self, text: str) -> str:
        return self.response_prefix + text

    def to_dict(self) -> dict:
        return {"kind": self.kind, "template": self.template, "response_prefix": self.response_prefix}

    @classmethod
    def from_dict(cls, d: dict) -> "SFTTask":
        return cls(d["template"], d.get("response_prefix", " "))

    def __eq__(self, other) -> bool:
        return isinstance(other, SFTTask) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"SFTTask(template={self.template!r}, response_prefix={self.response_prefix!r})"


def task_from_dict(d: dict) -> ClassificationTask | SFTTask:
    """Rebuild a task from `task.to_dict()`."""
    kind = d.get("kind")
    if kind == "classification":
        return ClassificationTask.from_dict(d)
    if kind == "sft":
        return SFTTask.from_dict(d)
    raise SalfError(f"unknown task kind {kind!r}; expected 'classification' or 'sft'")


# ---------------------------------------------------------------------------
# tokenization helpers

def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _ids_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts *before* a text by default (e.g. BOS); never the suffix (EOS)."""
    with_ = list(tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"])
    without = _ids(tokenizer, "a")
    n = len(without)
    for i in range(len(with_) - n + 1):
        if with_[i:i + n] == without:
            return with_[:i]
    return []


def pad_token_id(tokenizer) -> int:
    """The id used for padding: pad, else EOS, else 0."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def _fit_text(tokenizer, head: str, text: str, tail: str, budget: int, keep: str) -> list[int] | None:
    """Token ids of head + (a cut of text) + tail within `budget` tokens, or None if impossible.

    keep="end" cuts the *start* of text (keeps its end), keep="start" cuts its end.
    The string is re-tokenized after each cut, so the result tokenizes exactly as
    the shortened text would on its own.
    """
    full = _ids(tokenizer, head + text + tail)
    if len(full) <= budget:
        return full
    bare = _ids(tokenizer, head + tail)
    if len(bare) > budget:
        return None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
    n_text = max(len(offsets) if offsets else len(_ids(tokenizer, text)), 1)

    def cut_at(k: int) -> int:  # char position after dropping k tokens (from the kept side's opposite)
        k = min(max(k, 0), n_text)
        if offsets:
            if keep == "end":
                return offsets[k][0] if k < len(offsets) else len(text)
            return offsets[len(offsets) - k][0] if k > 0 else len(text)
        return (len(text) * k) // n_text if keep == "end" else len(text) - (len(text) * k) // n_text

    dropped = len(full) - budget
    for _ in range(50):
        pos = cut_at(dropped)
        if keep == "end":
            # start the kept text at a word boundary when one is near
            if 0 < pos < len(text) and not text[pos - 1].isspace():
                nxt = re.search(r"\s", text[pos:pos + 40])
                pos = pos + nxt.start() if nxt else pos
            part = text[pos:].lstrip()
        else:
            part = text[:pos].rstrip()
        ids = _ids(tokenizer, head + part + tail)
        if len(ids) <= budget:
            return ids
        if dropped >= n_text:
            break
        dropped += max(1, len(ids) - budget)
    return bare


def encode(task, tokenizer, rows, max_length: int) -> "Encoded":
    """Rows -> examples (dicts of python ints/lists), see module docstring.

    Classification examples: {"input_ids", "target_id", "label_index"}; a prompt
    longer than max_length loses the *start* of its text, so the template's tail
    (the cue, e.g. "Sentiment:") is always kept.
    SFT examples: {"input_ids", "labels"}; too-long examples keep the prompt's
    start and the template tail (cutting the end of the inserted text) and at
    least min(response, max(1, max_length // 4)) response tokens; an example left
    with no response token is dropped. The returned list has `.dropped` and
    `.truncated` counts.
    """
    if int(max_length) < 2:
        raise SalfError(f"max_length must be at least 2, got {max_length}")
    max_length = int(max_length)
    rows = list(rows)
    prefix = special_prefix(tokenizer)
    if isinstance(task, ClassificationTask):
        return _encode_classification(task, tokenizer, rows, prefix, max_length)
    if isinstance(task, SFTTask):
        return _encode_sft(task, tokenizer, rows, prefix, max_length)
    raise SalfError(f"unknown task {task!r}; expected a ClassificationTask or SFTTask")


def _encode_classification(task: ClassificationTask, tokenizer, rows: list, prefix: list[int],
                           max_length: int) -> "Encoded":
    """Classification examples; a prompt over budget loses the start of its text."""
    budget = max_length - len(prefix)
    out = Encoded()
    target_ids = task.label_token_ids(tokenizer)
    label_idx = [task.label_index(_field(r, "label")) for r in rows]
    texts = [str(_field(r, "text")) for r in rows]
    prompts = _ids_many(tokenizer, [task.prompt(t) for t in texts])
    for text, ids, li in zip(texts, prompts, label_idx):
        if len(ids) > budget:
            ids = _fit_text(tokenizer, task._head, text, task._tail, budget, keep="end")
            if ids is None:
                need = len(_ids(tokenizer, task._head + task._tail)) + len(prefix)
                raise SalfError(f"max_length {max_length} is too small for the template "
                                f"{task.template!r} (it alone takes {need} tokens)")
            out.truncated += 1
        out.append({"input_ids": prefix + ids, "target_id": target_ids[li], "label_index": li})
    return out


def _encode_sft(task: SFTTask, tokenizer, rows: list, prefix: list[int], max_length: int) -> "Encoded":
    """SFT examples; a row with an empty response, or none left after truncation, is dropped."""
    eos = getattr(tokenizer, "eos_token_id", None)
    tail_ids = [int(eos)] if eos is not None else []
    budget = max_length - len(prefix)
    out = Encoded()
    for r in rows:
        ptext, raw = str(_field(r, "prompt")), str(_field(r, "response"))
        if not raw.strip():
            out.dropped += 1
            continue
        p, resp = _sft_tokens(task, tokenizer, ptext, raw)
        if not resp:
            out.dropped += 1
            continue
        resp = resp + tail_ids
        if len(p) + len(resp) > budget:
            out.truncated += 1
            p, resp = _fit_sft(task, tokenizer, ptext, (p, resp), budget, max_length)
            if not resp:
                out.dropped += 1
                continue
        labels = [IGNORE_INDEX] * (len(prefix) + len(p)) + resp
        out.append({"input_ids": prefix + p + resp, "labels": labels})
    return out


def _sft_tokens(task: SFTTask, tokenizer, ptext: str, raw: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids); the response's ids are those it gets after the prompt when
    the prompt's own ids are a prefix of the joined text's, else its ids alone."""
    rtext = task.response(raw)
    p_str = task.prompt(ptext)
    p = _ids(tokenizer, p_str)
    joined = _ids(tokenizer, p_str + rtext)
    resp = joined[len(p):] if joined[:len(p)] == p else _ids(tokenizer, rtext)
    return p, resp


def _fit_sft(task: SFTTask, tokenizer, ptext: str, tokens: tuple[list[int], list[int]], budget: int,
             max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) within `budget`: the response keeps at least
    min(its length, max(1, max_length // 4)) tokens, the prompt's text is cut at its end to make
    room; an empty response means the example cannot fit."""
    p, resp = tokens
    min_resp = min(len(resp), max(1, max_length // 4))
    if len(p) + min_resp > budget:
        p = _fit_text(tokenizer, task._head, ptext, task._tail, budget - min_resp, keep="start")
        if p is None:
            return [], []
    return p, resp[:budget - len(p)]


class Encoded(list):
    """A list of encoded examples, with `.dropped` / `.truncated` counts."""

    def __init__(self, *args):
        super().__init__(*args)
        self.dropped = 0
        self.truncated = 0


def _field(row, name: str):
    try:
        return row[name]
    except (KeyError, TypeError):
        raise SalfError(f"row has no {name!r} field (fields: "
                        f"{', '.join(map(str, row)) if isinstance(row, dict) else type(row).__name__})") from None


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad encoded examples into a batch (left padding for classification, right for SFT)."""
    if not examples:
        raise SalfError("cannot collate an empty batch")
    if pad_id is None:
        raise SalfError("collate needs a pad_id (the tokenizer has neither pad nor eos token)")
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    if "target_id" in examples[0]:
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[i, width - k:] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, width - k:] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "target_ids": torch.tensor([e["target_id"] for e in examples], dtype=torch.long),
            "label_index": torch.tensor([e["label_index"] for e in examples], dtype=torch.long),
        }
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_task(batch: dict) -> str:
    """'classification' if the batch has target_ids, else 'sft'."""
    return "classification" if "target_ids" in batch else "sft"


def batches(task, tokenizer, rows, batch_size: int, max_length: int, shuffle: bool = False,
            seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Encode `rows` once and yield collated batches of `batch_size` (the last may be smaller)."""
    if int(batch_size) < 1:
        raise SalfError(f"batch_size must be at least 1, got {batch_size}")
    examples = encode(task, tokenizer, rows, max_length)
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    pad = pad_token_id(tokenizer)
    for start in range(0, len(order), int(batch_size)):
        yield collate([examples[i] for i in order[start:start + int(batch_size)]], pad)
