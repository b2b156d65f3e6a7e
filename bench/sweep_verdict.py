"""Publish finished sweeps and judge them against the sweep issue's targets.

For every sweep folder given (default: bench/results/sweep-*/ with a sweep.json), this
  * copies OUT/sweep.json to OUT.json (bench/results/sweep-<model>-<dataset>.json, the
    published file; rebuild the folder's report first with `salf sweep ... --report-only`),
  * prints one Markdown table per dataset: every selector's pick, its measured quality,
    whether it is safe and its cost relative to the oracle's cheapest safe cut (the
    default policy's row, sweep.json's "default_selector", is marked),
  * prints the targets, per dataset, as measured: SALF's default pick safe and at most
    1.25x the cheapest safe cost; no baseline at equal or lower cost better by more than
    the noise; the analysis at most 2% of the full fine-tuning run.

    python bench/sweep_verdict.py [FOLDER ...] > /tmp/verdict.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from salf.errors import SalfError
from salf.report.markdown import md_table
from salf.sweep import DEFAULT_ALIAS, cut_table

BASELINES = ("freeze-half", "freeze-first-k", "random", "spectrum", "block-influence",
             "block-influence-cut", "grad-norm")


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def label(name: str, s: dict) -> str:
    return f"{name} (default)" if name == s.get("default_selector") else name


def pick_table(s: dict) -> list[str]:
    lines = ["| selector | pick | seeds | quality | Δ vs full, same seeds | safe | FLOPs vs full | "
             "cost / cheapest safe |",
             "|---|---:|---:|---:|---:|:---:|---:|---:|"]
    for name, d in s["pick_details"].items():
        where = d.get("cut") if "cut" in d else "set " + ",".join(map(str, d.get("layers", [])))
        safe = {True: "yes", False: "no", None: "?"}[d.get("safe")]
        lines.append(f"| {label(name, s)} | {where} | {d.get('seeds', '–')} | {fmt(d.get('quality'), '.4f')} | "
                     f"{fmt(d.get('delta_vs_full'), '+.4f')} | "
                     f"{safe if d.get('quality') is not None else 'not run'} | "
                     f"{fmt(d.get('cost'))} | {fmt(d.get('cost_vs_cheapest_safe'), '.2f')} |")
    return lines


def targets(s: dict, judged: str) -> list[str]:
    higher = s["higher_is_better"]
    noise = s["oracle"]["noise"]
    out = []
    me = s["pick_details"].get(judged, {})
    default = "default, " if judged == s.get("default_selector") else ""
    if me.get("quality") is None:
        out.append(f"- {judged}'s pick not measured yet")
    else:
        ratio = me.get("cost_vs_cheapest_safe")
        ok = bool(me.get("safe")) and ratio is not None and ratio <= 1.25
        out.append(f"- {judged} ({default}eof {me['cut']}): safe {me.get('safe')}, cost / cheapest safe "
                   f"{fmt(ratio, '.2f')} -> target {'MET' if ok else 'NOT MET'}")
        for name, d in s["pick_details"].items():
            if name not in BASELINES or d.get("quality") is None or d["cost"] > me["cost"] + 1e-9:
                continue
            # each against full fine-tuning at its own seeds (paired), when both have that
            if d.get("delta_vs_full") is not None and me.get("delta_vs_full") is not None:
                gap = d["delta_vs_full"] - me["delta_vs_full"]
            else:
                gap = d["quality"] - me["quality"]
            better = gap if higher else -gap
            if better > noise:
                out.append(f"  - baseline {name} at cost {d['cost']:.3f} <= {me['cost']:.3f} beats "
                           f"it by {better:.4f} > noise {noise:.4f}")
    return out


def analysis_share(s: dict) -> list[str]:
    out = []
    full_train = [c.get("train_s") for c in s["cells"] if c["selector"] == "full" and c.get("train_s")]
    analysis = s.get("timing", {}).get("analysis_wall_s")
    if full_train and analysis:
        share = analysis / (sum(full_train) / len(full_train))
        out.append(f"- analysis {analysis:.0f} s vs full fine-tuning {sum(full_train) / len(full_train):.0f} s "
                   f"= {100 * share:.1f}% (target <= 2%: {'MET' if share <= 0.02 else 'NOT MET'})")
    return out


def judged_names(text: str, s: dict, folder: Path) -> list[str]:
    """--judge's selectors for one sweep; `salf` is the sweep's default policy."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if DEFAULT_ALIAS in names and "default_selector" not in s:
        raise SalfError(f"{folder}/sweep.json does not say which selector is the default: "
                        "rebuild it with `salf sweep ... --report-only`")
    return list(dict.fromkeys(s["default_selector"] if n == DEFAULT_ALIAS else n for n in names))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--judge", default="salf,max-gain",
                    help="comma-separated selectors judged against the targets; salf = the "
                         "sweep's default policy (default: salf,max-gain)")
    ap.add_argument("--number", default="",
                    help="number the headings as sections of this one, e.g. 4 -> '### 4.1 ...'")
    args = ap.parse_args(argv)
    here = Path(__file__).parent / "results"
    folders = args.folders or sorted(p for p in here.glob("sweep-*") if (p / "sweep.json").is_file())
    for i, folder in enumerate(folders, 1):
        s = json.loads((folder / "sweep.json").read_text())
        shutil.copyfile(folder / "sweep.json", folder.with_suffix(".json"))
        full = s["full"]
        number = f"{args.number}.{i} " if args.number else ""
        print(f"### {number}{s['model']} on {s['dataset']} ({s['metric']}, "
              f"{'higher' if s['higher_is_better'] else 'lower'} is better)\n")
        print(f"full fine-tuning {fmt(full['quality'], '.4f')} (mean of {full['seeds']} "
              f"seed{'s' if full['seeds'] != 1 else ''}, noise "
              f"{fmt(s['oracle']['noise'], '.4f')}); oracle's cheapest safe cut: "
              f"{s['oracle']['cheapest_safe_cut']} at {fmt(s['oracle']['cheapest_safe_cost'])} "
              f"of full's FLOPs\n")
        print(md_table(*cut_table(s)) + "\n")
        print(f"![frontier](results/{folder.name}/frontier.png)\n")
        print("\n".join(pick_table(s)) + "\n")
        for name in judged_names(args.judge, s, folder):
            print("\n".join(targets(s, name)))
        print("\n".join(analysis_share(s)) + "\n")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SalfError as e:
        print(f"sweep_verdict: error: {e}", file=sys.stderr)
        raise SystemExit(2)
