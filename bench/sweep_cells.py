"""Run named cells of an existing sweep, with that sweep's own settings.

`salf sweep --seeds 1,2,3` runs every cut and every pick at every seed; on two
CPU cores that is a day per dataset. This runs only the cells named, e.g. the
full run and the decisive cuts at more seeds, then refreshes sweep.json /
sweep.md / frontier.png from every cell on disk. The cells are exactly the
ones `salf sweep` would make (same key, same spec), so a later full
`salf sweep ... --seeds 1,2,3` reuses them. A dynamic cell (dyn-salf-s3) takes the
start cut and settings of its pick in sweep.json, as the folder's other seeds ran.

    python bench/sweep_cells.py bench/results/sweep-smollm2-135m-rotten-tomatoes \
        full-s2 cut04-s2 cut08-s2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from salf.errors import SalfError
from salf.sweep import (CELL_KEY, SweepConfig, cell_key, cell_kind, cell_spec, cell_stem,
                        folder_config, folder_lock, parse_cell_key, refresh_report,
                        run_cell_subprocess, wanted_cells)


def named_cell_spec(cfg: SweepConfig, sweep_dir: Path, key: str) -> dict:
    cells_dir = sweep_dir / "cells"
    picked = json.loads((sweep_dir / "sweep.json").read_text()).get("pick_details", {}) \
        if (sweep_dir / "sweep.json").exists() else {}
    dynamic = CELL_KEY.fullmatch(key)
    if dynamic and dynamic["dyn"] is not None:
        return cell_spec(cfg, dynamic_item(picked, key, int(dynamic["seed"])), cells_dir)
    item = parse_cell_key(key)
    stem = cell_stem(item)
    # a pick's cell keeps the selector name salf sweep gave it: that of the cell at another
    # seed, else that of the pick (a cut outside the grid or a layer set) in sweep.json
    same = [json.loads(p.read_text()) for p in sorted(cells_dir.glob(f"{stem}-s*.json"))]
    on_grid = cell_kind(item) == "cut" and (cfg.cuts is None or item["cut"] in cfg.cuts)
    by_pick = [] if on_grid else [n for n, p in picked.items() if cell_stem(p) == stem]
    selector = ("full" if cell_kind(item) == "full" else
                same[0].get("selector") if same else by_pick[0] if by_pick else None)
    return cell_spec(cfg, dict(item, selector=selector), cells_dir)


def dynamic_item(picked: dict, key: str, seed: int) -> dict:
    """A dyn-... cell at another seed: the start cut and settings of the dynamic pick in
    sweep.json whose cells it names (those the folder's other seeds ran), without training
    the full fine-tuning `salf sweep --seeds N` would add."""
    for name, pick in picked.items():
        if pick.get("dynamic") is not None:
            item = wanted_cells([], [name], picked, [seed])[-1]   # the item `salf sweep` makes
            if cell_key(item) == key:
                return item
    raise SalfError(f"no dynamic pick in sweep.json makes cell {key!r}: run `salf sweep "
                    "--selectors dyn-...` into the folder once")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a directory made by `salf sweep --out`")
    ap.add_argument("cells", nargs="+", help="cell names: full-s2, cut04-s2, set-0_1_18-s1, ...")
    args = ap.parse_args(argv)
    if not (args.sweep_dir / "config.json").is_file():
        raise SalfError(f"{args.sweep_dir} has no config.json: run `salf sweep --out` there first")
    with folder_lock(args.sweep_dir):  # not beside a sweep training the same cells
        cfg = folder_config(args.sweep_dir)  # an older folder's selectors are renamed first
        cells_dir = args.sweep_dir / "cells"
        # every name is checked before any cell trains
        specs = [named_cell_spec(cfg, args.sweep_dir, k) for k in args.cells]
        for spec in specs:
            if (cells_dir / f"{spec['key']}.json").exists():
                print(f"{spec['key']}: done before, kept", flush=True)
                continue
            done = run_cell_subprocess(spec, cells_dir, cfg.timeout_s)
            print(f"{spec['key']}: quality {done['quality']:.4f}, cost {done['cost']:.3f}, "
                  f"train {done['train_s']:.0f} s", flush=True)
            refresh_report(args.sweep_dir)
        refresh_report(args.sweep_dir)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SalfError as e:
        print(f"sweep_cells: error: {e}", file=sys.stderr)
        raise SystemExit(2)
