"""Linear probes per layer: how well can a linear classifier read the label from each frozen space?

A diagnostic for the sweep (RESULTS §4.8), not part of salf's analysis: the trace measures
how close each space is to the label words' directions *without training anything*;
this trains a logistic-regression probe on the pretrained hidden state at the prediction
position (the last prompt token) of every space and scores it on held-out rows. If a
task's label is linearly readable from a middle space about as well as from the last,
the layers above that space have less to learn — the question is whether this tells
the task where half the layers can be frozen (bbc-news) from the one where they cannot
(rotten-tomatoes).

    python bench/linear_probe.py --dataset bbc-news --train 512 --test 512 \
        --out bench/results/linear-probe/bbc-news.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from salf.data import load_dataset_spec
from salf.errors import SalfError
from salf.models import load_model
from salf.data import make_batches, sample_rows


@torch.no_grad()
def last_token_states(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, spaces, d], label index [N]) at the last position (batches are left-padded)."""
    feats, labels = [], []
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True)
        feats.append(torch.stack([h[:, -1, :].float() for h in out.hidden_states], dim=1))
        labels.append(batch["label_index"])
    return torch.cat(feats), torch.cat(labels)


def probe_accuracy(x_train, y_train, x_test, y_test, classes: int, l2: float) -> float:
    """Multinomial logistic regression (standardised features, L2, L-BFGS) -> test accuracy."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xa, xb = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(xa.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xa @ w + b, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xb @ w + b).argmax(1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", required=True, help="a classification dataset")
    ap.add_argument("--train", type=int, default=512, help="probe training rows (train split)")
    ap.add_argument("--test", type=int, default=512, help="probe test rows (test split)")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, required=True, help="JSON with the accuracy per space")
    args = ap.parse_args(argv)
    model, tok, _ = load_model(args.model)
    model.eval()
    ds = load_dataset_spec(args.dataset)
    if ds.task.kind != "classification":
        raise SalfError(f"{args.dataset} is a {ds.task.kind} dataset: a label probe needs classification")
    t0 = time.perf_counter()
    data = {}
    for split, n in (("train", args.train), ("test", args.test)):
        rows = sample_rows(ds.splits[split], n, 0, f"probe {split} rows")
        data[split] = last_token_states(model, make_batches(ds.task, tok, rows, 16, args.max_length))
    states_s = time.perf_counter() - t0
    (xa, ya), (xb, yb) = data["train"], data["test"]
    classes = len(ds.task.labels)
    acc = [probe_accuracy(xa[:, k], ya, xb[:, k], yb, classes, args.l2) for k in range(xa.shape[1])]
    majority = float(torch.bincount(yb, minlength=classes).max()) / len(yb)
    result = {"model": args.model, "dataset": args.dataset, "train_rows": len(ya),
              "test_rows": len(yb), "max_length": args.max_length, "l2": args.l2,
              "majority_accuracy": majority, "accuracy_by_space": acc,
              "states_s": round(states_s, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.dataset}: majority {majority:.3f}; probe accuracy by space (0 = embeddings):")
    print("  " + "  ".join(f"{k}:{a:.3f}" for k, a in enumerate(acc)))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SalfError as e:
        print(f"linear_probe: error: {e}", file=sys.stderr)
        raise SystemExit(2)
