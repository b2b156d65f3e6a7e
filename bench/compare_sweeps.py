"""Compare the cells two sweeps share (same cut and seed): does a sweep replicate on another machine?

A cell is one training run with a fixed seed, data order and test rows, so two
machines that run it should agree up to floating-point rounding. This prints,
for every cell key present in both sweeps, both qualities and held-out losses
and their differences, then the largest differences.

    python bench/compare_sweeps.py bench/results/sweep-h200-replication/rotten-tomatoes \
        bench/results/sweep-smollm2-135m-rotten-tomatoes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from salf.errors import SalfError
from salf.sweep import load_cells


def shared_cells(a_dir: Path, b_dir: Path) -> list[tuple[dict, dict]]:
    """(cell of A, cell of B) for each key both sweeps hold, in key order."""
    a = {c["key"]: c for c in load_cells(Path(a_dir) / "cells")}
    b = {c["key"]: c for c in load_cells(Path(b_dir) / "cells")}
    return [(a[k], b[k]) for k in sorted(a.keys() & b.keys())]


def comparison_table(pairs: list[tuple[dict, dict]], a_name: str, b_name: str) -> str:
    lines = [f"| cell | quality {a_name} | quality {b_name} | Δ quality | loss {a_name} | "
             f"loss {b_name} | Δ loss |", "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        lines.append(f"| {a['key']} | {a['quality']:.4f} | {b['quality']:.4f} | "
                     f"{a['quality'] - b['quality']:+.4f} | {a['loss']:.4f} | {b['loss']:.4f} | "
                     f"{a['loss'] - b['loss']:+.4f} |")
    dq = max(abs(a["quality"] - b["quality"]) for a, b in pairs)
    dl = max(abs(a["loss"] - b["loss"]) for a, b in pairs)
    lines.append(f"\n{len(pairs)} shared cells; largest |Δ quality| {dq:.4f}, "
                 f"largest |Δ loss| {dl:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="a sweep folder (with cells/)")
    ap.add_argument("b", type=Path, help="another sweep folder of the same model and dataset")
    ap.add_argument("--names", default="A,B", help="column names for the two sweeps (default A,B)")
    args = ap.parse_args(argv)
    pairs = shared_cells(args.a, args.b)
    if not pairs:
        raise SalfError(f"{args.a} and {args.b} share no cell (same cut and seed)")
    a_name, b_name = args.names.split(",", 1)
    print(comparison_table(pairs, a_name, b_name))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SalfError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
