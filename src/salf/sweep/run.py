"""`run_sweep`: train the cells a sweep asks for that its folder lacks, and report on all."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..errors import SalfError
from ..io import atomic_write_json, read_json
from .cells import cell_key, cell_kind, cell_spec, check_dynamic_cell, wanted_cells
from .folder import FOLDER_VERSION, backfill_cells, folder_lock, load_cells, merged_config, upgrade_folder
from .picks import selector_picks
from .report import summarize, write_sweep_report
from .runner import run_cells
from .settings import SweepConfig


def run_sweep(cfg: SweepConfig, progress: bool = True, log=print,
              dry_run: bool = False) -> dict | None:
    """Train the cells `cfg` asks for that the folder lacks; report on every cell it holds.

    dry_run: compute the analysis and picks (both kept), list the cells, train nothing.
    The folder is locked meanwhile (folder_lock).
    """
    with folder_lock(Path(cfg.out)):
        return _run_sweep(cfg, progress, log, dry_run)


def _run_sweep(cfg: SweepConfig, progress: bool, log, dry_run: bool) -> dict | None:
    out = Path(cfg.out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    saved = read_json(cfg_path, "sweep config") if cfg_path.exists() else None
    if saved and saved.get("training") != cfg.training_key():
        raise SalfError(f"{out} holds a sweep with other training settings "
                        f"({saved.get('training')}); use another --out")
    folder = merged_config(upgrade_folder(out, saved)["config"] if saved else None, cfg)
    cuts = grid_cuts(cfg)
    picks, timing = selector_picks(folder, progress)  # cached: only new selectors cost time
    backfill_cells(cfg, cells_dir)
    todo = wanted_cells(cuts, cfg.selectors, picks, cfg.seeds)
    wanted = {cell_key(t) for t in todo}
    missing = missing_cells(cfg, todo, cells_dir)
    if dry_run:
        log(f"{len(wanted) - len(missing)} of the {len(wanted)} cells asked for are done; "
            f"{len(missing)} to train: {', '.join(missing) or 'none'}")
        for name, p in picks.items():
            log(f"  pick {name}: " + (f"eof {p['cut']}" if "cut" in p else
                                      "layers " + ",".join(map(str, p["layers"]))))
        return None
    atomic_write_json(cfg_path, {"version": FOLDER_VERSION, "training": cfg.training_key(),
                                 "config": asdict(folder)})

    def report() -> dict:
        # every finished cell in the folder, also those of earlier runs with other lists
        summary = summarize(folder, load_cells(cells_dir), picks, timing)
        atomic_write_json(out / "sweep.json", summary)
        return summary

    train_missing(cfg, missing, len(wanted), report, log, progress)
    summary = report()
    write_sweep_report(out, summary)
    return summary


def grid_cuts(cfg: SweepConfig) -> list[int]:
    """The cuts of the grid (--cuts; every cut 0..L-1 for None), each checked against the model."""
    from ..models import anatomy, load_model

    model, _, _ = load_model(cfg.model)
    L = anatomy(model).num_layers
    del model
    cuts = cfg.cuts if cfg.cuts is not None else list(range(L))
    bad = [k for k in cuts if not 0 <= k < L]
    if bad:
        raise SalfError(f"cuts {bad} are outside 0..{L - 1} for this {L}-layer model")
    return cuts


def missing_cells(cfg: SweepConfig, todo: list[dict], cells_dir: Path) -> dict[str, dict]:
    """{key: spec} of the cells asked for that the folder lacks, in `todo` order (seed by
    seed); a finished dynamic cell must have run the settings asked for now."""
    missing: dict[str, dict] = {}
    for item in todo:
        key = cell_key(item)
        if key not in missing and not (cells_dir / f"{key}.json").exists():
            missing[key] = cell_spec(cfg, item, cells_dir)
        elif cell_kind(item) == "dyn":
            check_dynamic_cell(cells_dir / f"{key}.json", item)
    return missing


def train_missing(cfg: SweepConfig, missing: dict[str, dict], wanted: int, report, log,
                  progress: bool) -> None:
    """Train the missing cells (cfg.jobs at a time), a bar over the `wanted` cells; `report()`
    keeps sweep.json current after each cell."""
    from tqdm.auto import tqdm

    bar = tqdm(total=wanted, initial=wanted - len(missing), desc="sweep cells",
               unit="cell", disable=not progress)

    def finished(done: dict) -> None:
        log(f"  {done['key']}: quality {done['quality']:.4f}, cost {done['cost']:.3f}, "
            f"step {done['step_s'] or 0:.2f} s")
        bar.update(1)
        report()

    run_cells(list(missing.values()), Path(cfg.out) / "cells", cfg.timeout_s, cfg.jobs, finished,
              on_start=bar.set_postfix_str)
    bar.close()
