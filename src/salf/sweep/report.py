"""What a sweep reports: OUT/sweep.json (`summarize`), OUT/sweep.md and OUT/frontier.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text, read_json
from .cells import cell_kind
from .settings import DEFAULT_ALIAS, SweepConfig
from .folder import backfill_cells, folder_config, load_cells
from .picks import picks_from_cells
from .verdict import (Reference, cheapest_safe, cut_points, full_row, group_cells, noise_floor, oracle,
                      pick_row, quality_metric)


def summarize(cfg: SweepConfig, cells: list[dict], picks: dict, timing: dict) -> dict:
    """sweep.json (schema in docs/sweep.md): full fine-tuning, every cell, the frontier of
    cuts with their paired verdicts, each selector's pick and the oracle's cheapest safe cut.
    A selector whose cells the folder holds without a pick (copied in from another folder)
    gets the pick its cells record (picks.picks_from_cells)."""
    picks = {**picks, **picks_from_cells(cells, picks, cfg.default_selector)}
    metric = quality_metric(cells)
    higher = metric != "loss"
    groups = group_cells(cells)
    full_cells = groups.get("full", [])
    full = full_row(full_cells)
    full["noise"] = noise_floor(full_cells, full, higher, cfg.test_samples)
    ref = Reference({c["seed"]: c["quality"] for c in full_cells}, full["quality"],
                    full["noise"], higher)
    points = cut_points(groups, ref)
    cheapest = cheapest_safe(points)
    return {
        "model": cfg.model, "dataset": cfg.dataset, "metric": metric,
        "higher_is_better": higher, "settings": cfg.training_key(),
        "seeds": sorted({c["seed"] for c in cells}) or cfg.seeds,
        "full": full, "cells": cells, "cuts": points,
        "default_selector": cfg.default_selector,
        "picks": {k: v.get("cut") if cell_kind(v) == "cut" else None for k, v in picks.items()},
        "pick_details": {name: pick_row(p, groups, points, cheapest, ref)
                         for name, p in picks.items()},
        "oracle": oracle(cheapest, full["noise"]),
        "timing": timing,
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def cut_table(s: dict) -> tuple[list[str], list[list]]:
    """(header, rows) of a sweep summary's per-cut table: full, then every measured cut with
    its cost, quality, test loss, step time, safety and the selectors that picked it."""
    by_cut_picks: dict[int, list[str]] = {}
    for name, k in s["picks"].items():
        if k is not None:
            by_cut_picks.setdefault(k, []).append(name)

    def mean_std(d: dict) -> str:  # no "± 0" for one seed: its spread is unknown, not zero
        return f"{d['quality']:.4f}" + (f" ± {d['spread']:.4f}" if d["seeds"] > 1 else "")

    rows = [["full", 1.0, s["full"]["seeds"], mean_std(s["full"]),
             "–", s["full"]["loss"], s["full"]["step_s"], "–", ""]]
    for p in s["cuts"]:
        delta = p.get("delta_vs_full")
        rows.append([p["cut"], p["cost"], p["seeds"], mean_std(p),
                     "–" if delta is None else f"{delta:+.4f}", p["loss"],
                     p["step_s"], {True: "yes", False: "no", None: "?"}[p["safe"]],
                     ", ".join(by_cut_picks.get(p["cut"], []))])
    header = ["cut (eof)", "FLOPs vs full", "seeds", f"{s['metric']} (mean ± std)",
              "Δ vs full, same seeds", "test loss", "step s", "safe", "picked by"]
    return header, rows


def write_sweep_report(out: Path, s: dict) -> None:
    from ..report.markdown import md_table
    from ..report.plots import plot_frontier

    lines = [f"# sweep: {s['model']} on {s['dataset']}", "",
             f"metric: {s['metric']} ({'higher' if s['higher_is_better'] else 'lower'} is better), "
             f"seeds {s['seeds']}, settings `{json.dumps(s['settings'])}`", "",
             md_table(*cut_table(s)), "",
             f"Oracle's cheapest safe cut: {s['oracle']['cheapest_safe_cut']} "
             f"(rule: {s['oracle']['safe_rule']}).", ""]
    default = s.get("default_selector")  # absent from sweeps written before it was recorded
    for name, d in s["pick_details"].items():
        where = d.get("cut", d.get("layers"))
        if d.get("dynamic"):
            where = f"from eof {d['cut']}, schedules " + "; ".join(
                f"s{seed}: " + " -> ".join(f"{k}@{step}" for step, k in sched)
                for seed, sched in sorted((d.get("schedules") or {}).items()))
        label = f"**{name}**" + (f" (default, `{DEFAULT_ALIAS}`)" if name == default else "")
        if d.get("quality") is None:
            lines.append(f"- {label}: {where} — not measured yet — {d.get('reason', '')}")
            continue
        ratio = d.get("cost_vs_cheapest_safe")
        lines.append(f"- {label}: {where} — quality {d['quality']:.4f}, cost {d['cost']:.3f}, "
                     f"safe {d.get('safe')}, cost / cheapest safe "
                     f"{'–' if ratio is None else f'{ratio:.2f}'} — {d.get('reason', '')}")
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    # drawn once full fine-tuning is measured, with or without static cuts (--cuts none)
    if s["full"]["seeds"]:
        plot_frontier(out / "frontier.png", title=f"{s['model']} on {s['dataset']}",
                      metric=s["metric"], full=s["full"], cut_points=s["cuts"],
                      picks={k: v for k, v in s["pick_details"].items() if "quality" in v},
                      default=default, total_steps=s["settings"].get("steps"))


def refresh_report(out: Path) -> dict:
    """Recompute sweep.json from the cells on disk and redraw sweep.md / frontier.png."""
    out = Path(out)
    cfg = folder_config(out)
    previous = read_json(out / "sweep.json", "sweep summary")
    backfill_cells(cfg, out / "cells")
    picks = {name: {k: v for k, v in d.items()
                    if k in ("cut", "layers", "dynamic", "selector", "reason")}
             for name, d in previous["pick_details"].items()}
    summary = summarize(cfg, load_cells(out / "cells"), picks, previous.get("timing", {}))
    atomic_write_json(out / "sweep.json", summary)
    write_sweep_report(out, summary)
    return summary
