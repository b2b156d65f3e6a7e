"""Judge the dynamic cells of finished sweeps against the dynamic-freezing targets.

For every sweep folder given, prints one Markdown table of its dynamic selectors (dyn-*):
quality per seed, the paired difference from full fine-tuning, safe or not (the sweep's
rule), the integrated FLOPs relative to full fine-tuning and to the oracle's cheapest safe
*static* cut, the probes' share of the run per seed (FLOPs of the cost model, and measured
wall time), and the seed-1 cut schedule. Then the targets, per dataset, as measured:

  * dyn-salf safe;
  * its cost at most the target x the oracle's cheapest safe static cut (1.0; 1.1 for
    bbc-news at the published 120 steps, whose static oracle freezes 20 of 30 layers from
    step 0; 1.0 everywhere in a longer run, which also reports whether it reaches 0.6x of
    full fine-tuning);
  * no dynamic baseline safe at a lower cost (a variant of dyn-salf with other settings,
    "dyn-salf:key=value", is reported as a variant, not a baseline);
  * the probes at most 2% of the run.

A longer run's folder (e.g. `--budget-steps 360`) holds full fine-tuning, the 120-step
oracle's static cut and dyn-salf at one seed; its "cheapest safe static" is then the
cheapest of the static cuts it holds that is safe at its own length. A folder that holds
no static cut (`salf sweep --cuts none`) is judged against the oracle of the folder named
by --static-from (the 120-step sweep): a static cut's FLOPs are the same at every length,
its safety at this length is then unmeasured (were it unsafe, the static oracle would be a
shallower cut or full fine-tuning, which only lowers dyn-salf's ratio).

    python bench/dynamic_verdict.py bench/results/sweep-smollm2-135m-{rotten-tomatoes,bbc-news,chatterbot}
    python bench/dynamic_verdict.py --judged dyn-salf-budget --probe-target 0.01 FOLDERS...

With several folders of one run length it also prints the judged controller's mean cost
against #24's target (<= 0.70x full fine-tuning at 120 steps, <= 0.60x in longer runs), and
the floor any controller faces: per folder the cheapest cell measured safe (the static
oracle's or any dynamic selector's, at the seeds it ran), and their mean against the same
target. `--long` judges folders of mixed lengths as #24's long length (chatterbot's is 120
steps: full fine-tuning overfits it past that, bench/RESULTS.md §4.11):

    python bench/dynamic_verdict.py --long \
        bench/results/sweep-smollm2-135m-{rotten-tomatoes-360,bbc-news-360,chatterbot}

Rebuild each folder's sweep.json first (`salf sweep ... --report-only`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {"bbc-news": 1.1}      # cost / cheapest safe static at 120 steps; 1.0 elsewhere
PUBLISHED_STEPS = 120            # longer runs: 1.0 everywhere, and <= 0.6x full on one dataset
LONG_RUN_FULL_SHARE = 0.6
JUDGED = "dyn-salf"              # --judged: the controller the targets are about
PROBE_TARGET = 0.02              # --probe-target (#24 asks <= 1% of the run for salf-budget)
MEAN_COST_TARGET = {PUBLISHED_STEPS: 0.70, "long": 0.60}   # mean over the datasets given


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def cell_probe_share(cell: dict) -> tuple[float, float | None]:
    """(FLOPs share, measured wall-time share) of the probes in one cell. The wall share is
    over the time of all the run's steps (`steps_s_total`, across resumes) where the cell
    records it, else over its train_s; a resumed cell without it has none (its train_s
    covers only the steps after the resume, its probe seconds the whole run)."""
    seconds = cell["dynamic"]["probe"]["seconds"]
    if cell.get("steps_s_total"):
        wall = seconds / cell["steps_s_total"]
    elif cell.get("train_s") and not cell.get("resumed_from_step"):
        wall = seconds / cell["train_s"]
    else:
        wall = None
    return cell["dynamic"]["cost"]["probe_share_of_run"], wall


def probe_shares(cells: list[dict]) -> tuple[float | None, float | None]:
    """(FLOPs share, measured wall-time share) of the probes in a selector's cells, mean."""
    shares = [cell_probe_share(c) for c in cells]
    flops = [f for f, _ in shares]
    wall = [w for _, w in shares if w is not None]
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return mean(flops), mean(wall)


def probe_worst(row: dict) -> float:
    """The larger of a row's probe shares; an unmeasured share counts as the whole run, and a
    controller that reads no probe (0) meets any target."""
    return max(1.0 if x is None else x for x in (row["flops_share"], row["wall_share"]))


def probe_text(cells: list[dict]) -> str:
    """Per seed (the probe's cost changed between seeds when the read got cheaper)."""
    shares = [(c["seed"], *cell_probe_share(c)) for c in cells]
    if not any(f or w for _, f, w in shares):
        return "–"
    return "; ".join(f"{fmt(f, '.1%')}, {fmt(w, '.1%')} (s{seed})" for seed, f, w in shares)


def schedule_text(schedule: list[list[int]]) -> str:
    return " → ".join(f"{k}" + (f"@{s}" if s else "") for s, k in schedule)


def dynamic_rows(s: dict) -> list[dict]:
    rows = []
    for name, d in s["pick_details"].items():
        if not d.get("dynamic"):
            continue
        cells = sorted((c for c in s["cells"] if c.get("selector") == name), key=lambda c: c["seed"])
        flops_share, wall_share = probe_shares(cells) if cells else (None, None)
        rows.append(dict(d, name=name, cells=cells, flops_share=flops_share, wall_share=wall_share))
    return rows


def table(s: dict) -> list[str]:
    oracle = s["oracle"]["cheapest_safe_cost"]
    lines = [f"### {s['dataset']} ({s['metric']}; full fine-tuning {s['full']['quality']:.4f} over "
             f"{s['full']['seeds']} seeds, noise {s['oracle']['noise']:.4f}; oracle's cheapest safe "
             f"static cut eof {s['oracle']['cheapest_safe_cut']} at {fmt(oracle)})", "",
             "| dynamic selector | from eof | quality at FLOPs vs full, per seed | Δ vs full, same seeds | "
             "safe | FLOPs vs full (mean) | / cheapest safe static | probes: FLOPs, wall, per seed "
             "| schedule (seed 1) |",
             "|---|---:|---|---:|:---:|---:|---:|---|---|"]
    for r in dynamic_rows(s):
        per_seed = ", ".join(f"{c['quality']:.4f} at {c['cost']:.3f} (s{c['seed']})"
                             for c in r["cells"]) or "not run"
        first = next((c for c in r["cells"] if c["seed"] == 1), r["cells"][0] if r["cells"] else None)
        safe = {True: "yes", False: "no", None: "?"}[r.get("safe")]
        lines.append(f"| {r['name']} | {r['cut']} | {per_seed} | {fmt(r.get('delta_vs_full'), '+.4f')} | "
                     f"{safe if r['cells'] else '–'} | {fmt(r.get('cost'))} | "
                     f"{fmt(r.get('cost_vs_cheapest_safe'), '.2f')} | "
                     f"{probe_text(r['cells'])} | "
                     f"{schedule_text(first['dynamic']['schedule']) if first else '–'} |")
    return lines


def targets(s: dict, judged: str = JUDGED, probe_target: float = PROBE_TARGET) -> list[str]:
    rows = {r["name"]: r for r in dynamic_rows(s)}
    me = rows.get(judged)
    if not me or not me["cells"]:
        return [f"- {judged} not measured yet"]
    longer = s["settings"]["steps"] > PUBLISHED_STEPS
    limit = 1.0 if longer else TARGETS.get(s["dataset"], 1.0)
    ratio = me.get("cost_vs_cheapest_safe")
    out = [f"- {judged} safe: {me.get('safe')} ({len(me['cells'])} seeds)",
           f"- cost {fmt(me.get('cost'))} = {fmt(ratio, '.2f')}x the cheapest safe static cut "
           f"(target <= {limit}) -> {'MET' if ratio is not None and ratio <= limit else 'NOT MET'}",
           f"- probes {fmt(me['flops_share'], '.1%')} of the run's FLOPs, {fmt(me['wall_share'], '.1%')} "
           f"of its measured train time, mean over the seeds (target <= {probe_target:.0%}) -> "
           f"{'MET' if probe_worst(me) <= probe_target else 'NOT MET'}"]
    if longer:
        cost = me.get("cost")
        out.append(f"- {s['settings']['steps']} steps: cost {fmt(cost)} of full fine-tuning (target "
                   f"<= {LONG_RUN_FULL_SHARE} on at least one dataset) -> "
                   f"{'at most' if cost is not None and cost <= LONG_RUN_FULL_SHARE else 'above'} "
                   f"{LONG_RUN_FULL_SHARE} here")
    for name, r in rows.items():
        if name != judged and r["cells"] and r.get("safe") and r["cost"] < me["cost"]:
            kind = "variant" if name.startswith(judged + ":") else "baseline"
            out.append(f"- {kind} {name} is safe at a lower cost ({r['cost']:.3f} < {me['cost']:.3f})")
    return out


def borrow_oracle(s: dict, other: dict, source: str) -> None:
    """Judge a sweep that trained no static cut against another sweep's static oracle (same
    model, data and cost model): the FLOPs of a static cut do not depend on the run's length."""
    if s.get("cuts"):
        return                                    # its own frontier of static cuts
    o = other["oracle"]
    s["oracle"] = dict(s["oracle"], cheapest_safe_cut=f"{o['cheapest_safe_cut']} (from {source}, "
                       f"not trained at {s['settings']['steps']} steps)",
                       cheapest_safe_cost=o["cheapest_safe_cost"])
    for d in s["pick_details"].values():
        if d.get("dynamic") and d.get("cost") is not None:
            d["cost_vs_cheapest_safe"] = d["cost"] / o["cheapest_safe_cost"]


def read_sweep(folder: str) -> dict | None:
    path = Path(folder) / "sweep.json"
    if not path.is_file():
        print(f"dynamic_verdict: {path} does not exist", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--judged", default=JUDGED, metavar="SELECTOR",
                    help=f"the dynamic selector the targets judge (default {JUDGED})")
    ap.add_argument("--probe-target", type=float, default=PROBE_TARGET, metavar="F",
                    help=f"the probes' largest share of a run (default {PROBE_TARGET})")
    ap.add_argument("--static-from", metavar="DIR",
                    help="a sweep folder whose oracle judges folders that hold no static cut")
    ap.add_argument("--long", action="store_true",
                    help="the folders are #24's long length, whatever their steps (the 0.60x target)")
    args = ap.parse_args(argv)
    other = read_sweep(args.static_from) if args.static_from else None
    if args.static_from and other is None:
        return 2
    costs, floors = {}, {}
    for folder in args.folders:
        s = read_sweep(folder)
        if s is None:
            return 2
        if other is not None:
            borrow_oracle(s, other, args.static_from)
        print("\n".join(table(s) + [""] + targets(s, args.judged, args.probe_target) + [""]))
        me = {r["name"]: r for r in dynamic_rows(s)}.get(args.judged)
        if me and me["cells"] and me.get("cost") is not None:
            costs[s["dataset"]] = (me["cost"], s["settings"]["steps"])
        floors[s["dataset"]] = (cheapest_safe(s), s["settings"]["steps"])
    if len(costs) > 1:
        print(mean_cost_line(args.judged, costs, args.long))
    if len(floors) > 1:
        print("\n".join(floor_lines(floors, args.long)))
    return 0


def cheapest_safe(s: dict) -> tuple[str, float, int] | None:
    """The cheapest cell of the folder measured safe: the static oracle's cut or a dynamic
    selector judged safe at the seeds it ran — (name, cost, seeds); None if neither."""
    found = []
    oracle = s.get("oracle") or {}
    cut = oracle.get("cheapest_safe_cut")
    if oracle.get("cheapest_safe_cost") is not None and "not trained" not in str(cut):
        seeds = {c["seed"] for c in s["cells"] if c.get("selector") is None and c.get("cut") == cut}
        found.append((f"static eof {cut}", oracle["cheapest_safe_cost"], len(seeds)))
    found += [(r["name"], r["cost"], len(r["cells"])) for r in dynamic_rows(s)
              if r["cells"] and r.get("safe") and r.get("cost") is not None]
    return min(found, key=lambda f: f[1]) if found else None


def floor_lines(floors: dict, long: bool = False) -> list[str]:
    """What the cheapest safe cells measured so far give, per dataset and in the mean,
    against the mean-cost target: a floor for any controller judged on these folders."""
    out = []
    for dataset, (best, steps) in floors.items():
        out.append(f"- cheapest safe cell measured, {dataset} at {steps} steps: "
                   + (f"{best[0]} at {best[1]:.3f} ({best[2]} seed{'s' * (best[2] != 1)})" if best else "none"))
    known = [best[1] for best, _ in floors.values() if best]
    lengths = {steps for _, steps in floors.values()}
    if len(known) == len(floors):
        mean = sum(known) / len(known)
        limit = target_for(lengths, long)
        verdict = "no target" if limit is None else f"target <= {limit}: {'within' if mean <= limit else 'above'} it"
        out.append(f"- their mean: {mean:.3f} of full fine-tuning ({verdict})")
    return out


def target_for(lengths: set[int], long: bool) -> float | None:
    if long:
        return MEAN_COST_TARGET["long"]
    if len(lengths) > 1:
        return None
    return MEAN_COST_TARGET[PUBLISHED_STEPS if lengths == {PUBLISHED_STEPS} else "long"]


def mean_cost_line(judged: str, costs: dict[str, tuple[float, int]], long: bool = False) -> str:
    """The mean cost over the datasets given, against #24's target for their length."""
    lengths = {steps for _, steps in costs.values()}
    mean = sum(c for c, _ in costs.values()) / len(costs)
    limit = target_for(lengths, long)
    if limit is None:
        return f"- mean cost of {judged} over {', '.join(costs)}: {mean:.3f} (mixed run lengths: no target)"
    return (f"- mean cost of {judged} over {', '.join(costs)}: {mean:.3f} of full fine-tuning "
            f"(target <= {limit}) -> {'MET' if mean <= limit else 'NOT MET'}")


if __name__ == "__main__":
    raise SystemExit(main())
