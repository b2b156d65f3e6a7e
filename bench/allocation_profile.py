"""Where a run's loss decrease came from, layer by layer: the loss change allocation a
`--share-from updates` run (or the drift readings of an `--ahead-from drift` run) records at
every check (salf.dynamic.allocation), summed over windows of checks.

For each window it prints the steps, the cut in force, the total first-order decrease the
updates made (Σ lr·g·u over the trainable tensors, in the training loss's units) and each
layer's percentage of it (negative: that layer's updates raised the loss of the batches
that followed). No training: it reads a run folder's dynamic.json, or a sweep cell's
`dynamic.checks` (cells keep the allocation since the drift readings were added; older
cells have none, and their run's dynamic.json is in bench/results/salf-budget-dev/).

    python bench/allocation_profile.py \\
        "bench/results/salf-budget-dev/rotten-tomatoes-360-s2-ahead_from=updates-ef739e2-stopped-at-162.dynamic.json" \\
        --window 3 --every 1
"""

from __future__ import annotations

import argparse
import json


def checks_of(path: str) -> list[dict]:
    with open(path) as f:
        record = json.load(f)
    checks = (record.get("dynamic") or record).get("checks") or []
    return [c for c in checks if c.get("allocation")]


def profile(checks: list[dict], window: int) -> list[dict]:
    """Per window of `window` checks: steps, the cut, the summed allocation per layer (+ the
    rest) and its total."""
    rows = []
    for start in range(0, len(checks), window):
        part = checks[start:start + window]
        width = len(part[0]["allocation"])
        sums = [sum(c["allocation"][i] for c in part) for i in range(width)]
        rows.append({"from": part[0]["step"] - (part[0].get("allocation_steps") or 0), "to": part[-1]["step"],
                     "eof": part[-1]["eof"], "total": sum(sums), "layers": sums[:-1], "rest": sums[-1]})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("record", help="a sweep cell (.json) or a run's dynamic.json")
    ap.add_argument("--window", type=int, default=8, help="checks per row (default 8)")
    ap.add_argument("--every", type=int, default=1, help="print every Nth layer (default all)")
    args = ap.parse_args(argv)
    checks = checks_of(args.record)
    if not checks:
        raise SystemExit(f"{args.record}: no check with an allocation (not a --share-from updates run)")
    rows = profile(checks, args.window)
    width = len(rows[0]["layers"])
    shown = list(range(0, width, args.every))
    print("| steps | cut | total decrease | " + " | ".join(f"L{i + 1}" for i in shown) + " | rest |")
    print("|---|---:|---:|" + "---:|" * (len(shown) + 1))
    for r in rows:
        scale = sum(abs(x) for x in r["layers"]) + abs(r["rest"]) or 1.0
        cells = [f"{100 * r['layers'][i] / scale:+.0f}%" for i in shown]
        print(f"| {r['from']}-{r['to']} | {r['eof']} | {r['total']:+.4f} | " + " | ".join(cells)
              + f" | {100 * r['rest'] / scale:+.0f}% |")


if __name__ == "__main__":
    main()
