"""`salf sweep`: the oracle frontier and every selector's pick, measured the same way.

A sweep trains the model at each cut of a grid (and at each selector's pick),
with identical hyper-parameters, data order and test rows, for each seed, and
records held-out quality and measured cost. Each *cell* (one cut or selector
set, one seed) runs in its own subprocess (`python -m salf.sweep SPEC`), so its
peak memory is its own and a crash or kill loses only that cell; its result is
written atomically to OUT/cells/<key>.json and never recomputed. Rerunning the
same command resumes. Aggregates go to OUT/sweep.json (schema in docs/sweep.md),
OUT/sweep.md and OUT/frontier.png.

    settings  SweepConfig and the selectors' names
    cells     cell keys, specs, the cells a run asks for, a cell's predicted cost
    runner    one cell in this process or a subprocess; `jobs` cells at a time
    picks     each selector's pick (OUT/analysis/picks.json)
    folder    OUT/config.json (upgraded), the folder lock, the finished cells
    verdict   the statistics: mean and spread, full's noise, the paired "safe" verdict
    report    sweep.json, sweep.md, frontier.png
    run       run_sweep
"""

from .cells import (CELL_KEY, cell_cost, cell_key, cell_kind, cell_spec, cell_stem, check_dynamic_cell,
                    parse_cell_key, wanted_cells)
from .folder import (FOLDER_VERSION, LOCK_FILE, backfill_cells, folder_config, folder_lock, load_cells,
                     merged_config, upgrade_folder)
from .picks import selector_picks
from .report import cut_table, refresh_report, summarize, write_sweep_report
from .run import run_sweep
from .runner import (cell_environments, cell_process_env, die_with_parent, dynamic_record, run_cell,
                     run_cell_subprocess, run_cells)
from .settings import (DEFAULT_ALIAS, DYNAMIC_PREFIX, OLD_SELECTOR_NAMES, PREFIX_SELECTORS, SET_SELECTORS,
                       SweepConfig, check_sweep_arguments, is_salf_policy, parse_selectors, resolve_selectors,
                       selector_dynamic_settings)
from .verdict import (CUT_PICK_FIELDS, OTHER_PICK_FIELDS, SAFE_RULE, Reference, cheapest_safe, cut_points,
                      full_row, group_cells, judge, measure, noise_floor, oracle, pick_row, quality_metric)

__all__ = [
    "CELL_KEY", "cell_cost", "cell_key", "cell_kind", "cell_spec", "cell_stem", "check_dynamic_cell",
    "parse_cell_key", "wanted_cells",
    "FOLDER_VERSION", "LOCK_FILE", "backfill_cells", "folder_config", "folder_lock", "load_cells",
    "merged_config", "upgrade_folder",
    "selector_picks",
    "cut_table", "refresh_report", "summarize", "write_sweep_report",
    "run_sweep",
    "cell_environments", "cell_process_env", "die_with_parent", "dynamic_record", "run_cell",
    "run_cell_subprocess", "run_cells",
    "DEFAULT_ALIAS", "DYNAMIC_PREFIX", "OLD_SELECTOR_NAMES", "PREFIX_SELECTORS", "SET_SELECTORS",
    "SweepConfig", "check_sweep_arguments", "is_salf_policy", "parse_selectors", "resolve_selectors",
    "selector_dynamic_settings",
    "CUT_PICK_FIELDS", "OTHER_PICK_FIELDS", "SAFE_RULE", "Reference", "cheapest_safe", "cut_points",
    "full_row", "group_cells", "judge", "measure", "noise_floor", "oracle", "pick_row", "quality_metric",
]
