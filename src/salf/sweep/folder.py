"""The sweep's folder: its config.json (upgraded from older versions), the lock a sweep
holds while writing it, and the finished cells it holds (brought up to date)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import SalfError
from ..io import atomic_write_json, read_json
from .cells import cell_cost
from .settings import OLD_SELECTOR_NAMES, SweepConfig

# config.json's "version". Folders without one named max-gain "salf" and max-gain-e0
# "salf-e0"; salf renames them when it opens such a folder (upgrade_folder).
FOLDER_VERSION = 2
# OUT/<this>: flock'ed by the sweep writing the folder, and holding its PID
LOCK_FILE = ".sweep.lock"


def _renamed(name: str | None) -> str | None:
    return OLD_SELECTOR_NAMES.get(name, name)


def upgrade_folder(out: Path, saved: dict) -> dict:
    """OUT/config.json's content `saved`, brought to FOLDER_VERSION. In a folder from before
    it the selectors are renamed (OLD_SELECTOR_NAMES) in the cells, sweep.json and
    config.json, written last: an upgrade cut short is redone on the next open."""
    if saved.get("version", 1) >= FOLDER_VERSION:
        return saved
    out = Path(out)
    for cell in load_cells(out / "cells"):
        if cell.get("selector") in OLD_SELECTOR_NAMES:
            atomic_write_json(out / "cells" / f"{cell['key']}.json",
                              dict(cell, selector=_renamed(cell["selector"])))
    if (out / "sweep.json").exists():
        s = read_json(out / "sweep.json", "sweep summary")
        atomic_write_json(out / "sweep.json", dict(
            s, cells=[dict(c, selector=_renamed(c.get("selector"))) for c in s["cells"]],
            picks={_renamed(k): v for k, v in s["picks"].items()},
            pick_details={_renamed(k): v for k, v in s["pick_details"].items()}))
    config = dict(saved["config"], selectors=[_renamed(n) for n in saved["config"]["selectors"]])
    upgraded = {"version": FOLDER_VERSION, "training": saved["training"],
                "config": asdict(SweepConfig(**config))}
    atomic_write_json(out / "config.json", upgraded)
    return upgraded


def folder_config(out: Path) -> SweepConfig:
    """The sweep OUT/config.json describes (an older folder is upgraded first)."""
    out = Path(out)
    return SweepConfig(**upgrade_folder(out, read_json(out / "config.json", "sweep config"))["config"])


def merged_config(saved: dict | None, cfg: SweepConfig) -> SweepConfig:
    """The folder's sweep once this run is added to it: its cuts, selectors and seeds are
    those of earlier runs plus this one's. A rerun with fewer of them runs only what it
    asks for, but never drops earlier cells and picks from config.json and the report."""
    if not saved:
        return cfg
    old = SweepConfig(**saved)

    def union(a: list, b: list) -> list:
        return list(a) + [x for x in b if x not in a]

    cuts = None if old.cuts is None or cfg.cuts is None else union(old.cuts, cfg.cuts)
    return replace(cfg, cuts=cuts, selectors=union(old.selectors, cfg.selectors),
                   seeds=sorted(set(old.seeds) | set(cfg.seeds)))


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold OUT/.sweep.lock while writing the sweep folder `out`: another sweep into it is
    refused, naming the holder's PID (two sweeps would train the same cells in the same work
    folders). The kernel drops an flock when its holder dies, however it dies, so a killed
    sweep never blocks the rerun; the descriptor is not inherited (PEP 446), so no cell holds it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise SalfError(f"{out} is in use by another sweep (PID {holder}); wait for it to "
                            "end, or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def backfill_cells(cfg: SweepConfig, cells_dir: Path) -> None:
    """Bring cells written by an older salf up to date, from what the folder holds:
    `test_rows` (min(test_samples, size of the test split), the same for every cell) so the
    binomial noise uses the real count; and the cost of layer-set cells, which older
    versions charged as the prefix from their lowest layer (every layer trained)."""
    cells = {Path(cells_dir) / f"{c['key']}.json": c for c in load_cells(cells_dir)}
    no_rows = [p for p, c in cells.items() if "test_rows" not in c]
    old_sets = [p for p, c in cells.items() if c.get("layers") and "cost_basis" not in c]
    n = None
    if no_rows:
        from ..data import load_dataset_spec
        from ..data import first_rows

        ds = load_dataset_spec(cfg.dataset, **cfg.data_kwargs)
        n = len(first_rows(ds, "test", cfg.test_samples))
    if old_sets:
        from ..analysis import Trace
        from ..cost import ModelShape

        tr = Trace.from_json(Path(cells_dir).parent / "analysis" / "trace.json")
        shape = ModelShape.from_dict(tr.extra["cost"]["shape"])
        spec = {"max_length": cfg.max_length, "batch_size": cfg.batch_size, "head": cfg.head}
    for p, cell in cells.items():
        new = dict(cell)
        if p in no_rows:
            new["test_rows"] = n
        if p in old_sets:
            new.update(cost=cell_cost(shape, min(cell["layers"]), cell["layers"], spec, tr.task),
                       cost_basis="trained-layers")
        if new != cell:
            atomic_write_json(p, new)


def load_cells(cells_dir: Path) -> list[dict]:
    """Finished cells on disk, in key order."""
    return [read_json(p, "sweep cell") for p in sorted(Path(cells_dir).glob("*.json"))
            if not p.name.startswith(".")]  # .<key>.spec.json: a spec (until 2026-12-05)
