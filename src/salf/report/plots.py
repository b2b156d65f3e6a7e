"""Plots a user looks at to understand a cut: the trace and the cost-benefit trade-off."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..io import atomic_path  # noqa: E402

FROZEN = "#c9d3e0"
ACCENT = "#d1495b"
INK = "#2e4057"
GOLD = "#edae49"
TEAL = "#00798c"


def write_trace_plot(path: Path, tr, plan, choice: dict, cost: dict, fit: dict) -> Path:
    """trace.png of one analysis: the series `plot_trace` draws, taken from the trace and plan."""
    from ..analysis import inference_gains

    L = tr.num_layers
    fitted = None
    if fit.get("ok"):
        fitted = [fit["E"] + fit["A"] * (l + 1) ** (-fit["alpha"]) for l in range(L + 1)]
    se = tr.metric("deviation_se")
    lens = tr.metric("lens_acc") if tr.task == "classification" else None
    labels = tr.settings.get("label_token_ids") or []
    curve = choice["curve"]
    source = "depth-law fit" if curve["source"] == "depth" else f"{curve['source']} law"
    if curve.get("fallback"):
        source += " (depth fit rejected)"
    examples = tr.data.get("n_examples")
    sample = f"{tr.task}, {examples} examples" if examples else tr.task
    return plot_trace(path, TraceSeries(
        title=f"{tr.model.get('spec')} on {tr.data.get('dataset')} ({sample}) — "
              f"policy {plan.policy}: eof = {plan.eof}",
        deviation=tr.deviations, deviation_se=None if None in se else se,
        fitted=fitted, fit_r2=fit.get("r2"), gains=inference_gains(tr),
        lens_accuracy=None if lens is None or None in lens else lens,
        chance=1 / len(labels) if labels else None, eof=plan.eof,
        cost=[c["flops_ratio"] for c in cost["cuts"][:L]], benefit=list(curve["benefit"])[:L],
        benefit_source=source))


@dataclass(frozen=True)
class TraceSeries:
    """What the trace figure draws. deviation (and deviation_se, fitted, lens_accuracy) has
    L+1 entries, space 0 = the embedding output; gains has L (layer l at index l-1); cost and
    benefit describe the cuts eof = 0..L-1; `chance` is the lens accuracy of a guess,
    `benefit_source` how the benefit was predicted (the cost-benefit axis says it)."""

    title: str
    deviation: list[float]
    gains: list[float]
    eof: int
    cost: list[float]
    benefit: list[float]
    deviation_se: list[float] | None = None
    fitted: list[float] | None = None
    fit_r2: float | None = None
    lens_accuracy: list[float] | None = None
    chance: float | None = None
    benefit_source: str = ""


def plot_trace(path: Path, series: TraceSeries | None = None, **fields) -> Path:
    """Write `trace_figure(series, **fields)` to `path` as a PNG."""
    fig = trace_figure(series, **fields)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def trace_figure(series: TraceSeries | None = None, **fields):
    """The trace figure: left, per latent space, the deviation D_l (bars from 0, ± its
    standard error), the gain per layer and (classification) the lens accuracy, each on
    its own axis; right, predicted cost vs benefit of every cut. See docs/method.md.

    `series`: a TraceSeries, or its fields as keyword arguments (`trace_figure(title=...,
    deviation=..., ...)`; with a `series`, they replace its fields).
    """
    s = TraceSeries(**fields) if series is None else replace(series, **fields)
    L = len(s.deviation) - 1
    rows = 3 if s.lens_accuracy is not None else 2
    with plt.rc_context({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10}):
        fig = plt.figure(figsize=(15, 3.1 * rows + 1.4))
        grid = fig.add_gridspec(rows, 2, width_ratios=[1.55, 1], height_ratios=[1.5] + [1] * (rows - 1),
                                left=0.06, right=0.98, top=1 - 0.75 / fig.get_figheight(),
                                bottom=0.7 / fig.get_figheight(), hspace=0.12, wspace=0.16)
        left = [fig.add_subplot(grid[0, 0])]
        left += [fig.add_subplot(grid[r, 0], sharex=left[0]) for r in range(1, rows)]
        for ax in left:
            _mark_cut(ax, s.eof, L)
        _deviation_panel(left[0], s.deviation, s.deviation_se, s.fitted, s.fit_r2, s.eof, L)
        _gain_panel(left[1], s.gains)
        if s.lens_accuracy is not None:
            _lens_panel(left[2], s.lens_accuracy, s.chance)
        _space_ticks(left[-1], L)
        _cost_benefit_panel(fig.add_subplot(grid[:, 1]), s.cost, s.benefit, s.eof, s.benefit_source)
        fig.suptitle(s.title, fontsize=12)
    return fig


def _mark_cut(ax, eof: int, L: int) -> None:
    """The frozen part shaded, the cut a dashed line between space eof and eof+1."""
    ax.axvspan(-0.5, eof + 0.5, color=FROZEN, alpha=0.45, lw=0)
    ax.axvline(eof + 0.5, color=ACCENT, lw=1.5, ls="--")
    ax.set_xlim(-0.7, L + 0.7)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelbottom=False)


def _deviation_panel(ax, deviation, se, fitted, fit_r2, eof: int, L: int) -> None:
    spaces = range(L + 1)
    ax.bar(spaces, deviation, color=INK, alpha=0.8, width=0.75,
           yerr=se, error_kw={"ecolor": "k", "capsize": 2, "lw": 1},
           label="deviation $D_l$" + (" ± 1 s.e." if se is not None else ""))
    if fitted is not None:
        r2 = f" (R² {fit_r2:.2f})" if fit_r2 is not None else ""
        ax.plot(spaces, fitted, color=GOLD, lw=2, label=f"fitted depth law{r2}")
    top = max(d + e for d, e in zip(deviation, se or [0.0] * len(deviation)))
    ax.set_ylim(0, 1.3 * top)  # bars start at 0, so their heights compare honestly; room for the legend
    ax.set_ylabel("deviation $D_l$ = mean(1 − cos)")
    frozen = f"embeddings + layers 1–{eof} frozen" if eof else "embeddings frozen"
    trained = f"layers {eof + 1}–{L} trained" if eof + 1 < L else f"layer {L} trained"
    right = eof + 0.5 > L / 2  # put the label on the side of the line with room
    ax.text(eof + 0.5, 1.02, f"cut eof = {eof}: {frozen}, {trained} ", color=ACCENT,
            ha="right" if right else "left", va="bottom", transform=ax.get_xaxis_transform())
    ax.legend(loc="upper left", ncol=2, fontsize=9, framealpha=0.9)


def _gain_panel(ax, gains) -> None:
    layers = range(1, len(gains) + 1)
    ax.bar(layers, [max(g, 0.0) for g in gains], width=0.75, color=INK, alpha=0.8,
           label=r"$\Delta_l = D_{l-1} - D_l \geq 0$: layer $l$ lowers $D$")
    if min(gains) < 0:
        ax.bar(layers, [min(g, 0.0) for g in gains], width=0.75, color=ACCENT, alpha=0.8,
               label=r"$\Delta_l < 0$: layer $l$ raises $D$")
    ax.axhline(0, color="k", lw=0.8)
    lo, hi = min(0.0, *gains), max(0.0, *gains)
    span = hi - lo or 1.0
    ax.set_ylim(lo - 0.08 * span, hi + 0.45 * span)  # headroom for the legend
    ax.set_ylabel(r"gain $\Delta_l$ of decoder layer $l$")
    ax.legend(loc="upper left", ncol=2, fontsize=9, framealpha=0.9)


def _lens_panel(ax, accuracy, chance) -> None:
    ax.plot(range(len(accuracy)), accuracy, color=TEAL, marker="o", ms=4, lw=1.5,
            label="lens accuracy (nearest label direction)")
    if chance is not None:
        ax.axhline(chance, color="#777", lw=1, ls=":", label=f"chance (1/{round(1 / chance)})")
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_ylabel("lens accuracy")
    ax.legend(loc="upper left", fontsize=9, framealpha=0.9)


def _space_ticks(ax, L: int) -> None:
    """A tick label on every space while they fit (about 45 across), else on every n-th."""
    step = max(1, math.ceil((L + 1) / 45))
    ax.set_xticks(range(0, L + 1, step))
    ax.tick_params(labelbottom=True, labelsize=9)
    ax.set_xlabel("latent space l (0 = embedding output, l = output of decoder layer l)")


def _cost_benefit_panel(ax, cost, benefit, eof: int, source: str) -> None:
    ax.plot(cost, benefit, color=INK, marker="o", ms=4, lw=1, label="cut eof = k (labelled k)")
    ax.scatter([cost[eof]], [benefit[eof]], s=110, color=ACCENT, zorder=5, label=f"chosen: eof = {eof}")
    ax.set_xlabel("predicted training FLOPs relative to full fine-tuning")
    ax.set_ylabel("predicted benefit B(k)" + (f" — {source}" if source else ""))
    ax.set_title("predicted cost vs benefit of every cut")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    ax.margins(x=0.06, y=0.12)
    if max(benefit) <= 0:
        ax.text(0.5, 0.6, "no cut predicts a benefit: B(k) = 0 for every k", ha="center",
                transform=ax.transAxes)
    _label_points(ax, cost, benefit, first=eof)


def _label_points(ax, xs, ys, first: int) -> None:
    """Label point k with "k" wherever the label does not overlap one placed before;
    the chosen point first, then the others from the cheapest cut down."""
    renderer = ax.figure.canvas.get_renderer()
    placed = []
    for k in [first] + [k for k in reversed(range(len(xs))) if k != first]:
        text = ax.annotate(str(k), (xs[k], ys[k]), textcoords="offset points", xytext=(3, 4),
                           fontsize=10 if k == first else 8, color=ACCENT if k == first else INK,
                           fontweight="bold" if k == first else "normal")
        box = text.get_window_extent(renderer).expanded(1.15, 1.1)
        if any(box.overlaps(b) for b in placed):
            text.remove()
        else:
            placed.append(box)


def plot_frontier(path: Path, *, title: str, metric: str, full: dict, cut_points: list[dict],
                  picks: dict[str, dict], default: str | None = None,
                  total_steps: int | None = None) -> Path:
    """Quality vs measured cost: every cut (mean ± spread), full FT, each selector's pick —
    static picks as open markers, dynamic runs (a cut that moves while training) as stars —
    and, when there are dynamic runs, their cut schedules in a second panel.

    cut_points: [{"cut", "cost", "quality", "spread"}]; picks: name -> {"cut" or "layers",
    "cost", "quality"} (a dynamic one also "dynamic" and "schedules": {seed: [[step, eof]]});
    default: the pick the legend marks as the default policy's.
    The frontier is the upper (accuracy) or lower (loss) envelope going from cheap to expensive.
    """
    moving = {n: p for n, p in picks.items() if p.get("dynamic") and p.get("schedules")}
    if moving:
        fig, (ax, ax_s) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(8, 5))
    _frontier_panel(ax, metric, full, cut_points, picks, default)
    ax.set_title(title, fontsize=10)
    if moving:
        _schedule_panel(ax_s, moving, total_steps)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


def _frontier_panel(ax, metric: str, full: dict, cut_points: list[dict], picks: dict[str, dict],
                    default: str | None) -> None:
    higher_better = metric != "loss"
    pts = sorted(cut_points, key=lambda p: p["cost"])
    ax.errorbar([p["cost"] for p in pts], [p["quality"] for p in pts],
                yerr=[p.get("spread") or 0 for p in pts], fmt="o", color=INK, ms=4, capsize=2,
                label="fine-tune at cut (mean ± spread)")
    for p in pts:
        ax.annotate(str(p["cut"]), (p["cost"], p["quality"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -8))
    frontier, best = [], None
    for p in pts:
        if best is None or (p["quality"] > best if higher_better else p["quality"] < best):
            best = p["quality"]
            frontier.append(p)
    ax.plot([p["cost"] for p in frontier], [p["quality"] for p in frontier], color=INK, lw=1,
            alpha=0.5, label="frontier (static cuts)")
    # the band a safe cut must reach: full's noise (seed spread or test-row error) when known
    band = full.get("noise") if full.get("noise") is not None else (full.get("spread") or 0)
    ax.axhspan(full["quality"] - band, full["quality"] + band, color="#999", alpha=0.2, lw=0,
               label="full fine-tuning ± noise")
    ax.scatter([1.0], [full["quality"]], marker="s", s=60, color="#555", label="full fine-tuning",
               zorder=4)
    static_markers, dynamic_markers = "D^v<>ph", "*PX"
    n_static = n_dynamic = 0
    for name, p in sorted(picks.items()):
        if p.get("cost") is None or p.get("quality") is None:
            continue
        if p.get("dynamic"):
            marker, size = dynamic_markers[n_dynamic % len(dynamic_markers)], 160
            where, n_dynamic = f"dynamic from eof {p['cut']}", n_dynamic + 1
        else:
            marker, size = static_markers[n_static % len(static_markers)], 70
            where = (f"eof={p['cut']}" if p.get("cut") is not None else
                     f"{len(p.get('layers') or [])} layers")
            n_static += 1
        ax.scatter([p["cost"]], [p["quality"]], marker=marker, s=size, zorder=5,
                   label=f"{name} ({'default, ' if name == default else ''}{where})",
                   edgecolor="k", linewidth=0.5)
    ax.set_xlabel("training FLOPs relative to full fine-tuning")
    ax.set_ylabel(metric + (" (higher is better)" if higher_better else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _schedule_panel(ax, moving: dict[str, dict], total_steps: int | None) -> None:
    """The cut in force over training steps, one line per dynamic selector and seed."""
    for i, (name, p) in enumerate(sorted(moving.items())):
        for j, (seed, schedule) in enumerate(sorted(p["schedules"].items())):
            steps = [s for s, _ in schedule]
            eofs = [k for _, k in schedule]
            end = max(total_steps or 0, steps[-1] + 1)
            label = f"{name} (seeds {', '.join(sorted(p['schedules']))})" if j == 0 else None
            ax.step(steps + [end], eofs + [eofs[-1]], where="post", color=f"C{i}",
                    lw=2 if j == 0 else 1, alpha=1.0 if j == 0 else 0.5, label=label)
    ax.set_xlabel("optimizer step (a move after the check at that step)")
    ax.set_ylabel("cut in force (eof: layers frozen)")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("dynamic runs: the cut schedule", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
