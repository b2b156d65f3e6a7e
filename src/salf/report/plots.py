"""Plots a user looks at to understand a cut: the trace and the cost-benefit trade-off."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_path  # noqa: E402

FROZEN = "#c9d3e0"
ACCENT = "#d1495b"
INK = "#2e4057"


def plot_trace(path: Path, *, title: str, deviation: list[float], gains: list[float],
               fitted: list[float] | None, eof: int, cuts: list[int], cost: list[float],
               benefit: list[float], metric_name: str = "deviation D_l",
               second: list[float] | None = None, second_name: str | None = None) -> Path:
    """Two panels: (1) D_l per latent space with per-layer gain and the cut, (2) cost vs benefit.

    deviation has L+1 entries (space 0 = embedding output); gains has L entries
    (layer l = D_{l-1} - D_l); cuts/cost/benefit describe every candidate eof.
    """
    L = len(deviation) - 1
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1.7, 1]})

    # panel 1 -------------------------------------------------------------
    spaces = list(range(L + 1))
    ax.axvspan(-0.5, eof + 0.5, color=FROZEN, alpha=0.6, lw=0,
               label=f"frozen: embeddings + layers 1-{eof}" if eof else "frozen: embeddings")
    ax.bar(spaces, deviation, color=INK, alpha=0.75, width=0.8, label=metric_name)
    if fitted is not None:
        ax.plot(spaces, fitted, color="#edae49", lw=2, label="fitted depth law")
    if second is not None:
        ax.plot(spaces, second, color="#00798c", lw=1.5, marker=".", label=second_name)
    lo = min(min(deviation), min(second) if second else 1e9)
    hi = max(max(deviation), max(second) if second else -1e9)
    pad = 0.08 * (hi - lo or 1.0)
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_xlabel("latent space l (0 = embedding output, l = output of decoder layer l)")
    ax.set_ylabel(metric_name)
    ax.axvline(eof + 0.5, color=ACCENT, lw=2, ls="--")
    ax.text(eof + 0.5, 1.01, f"cut: eof = {eof}", color=ACCENT, ha="center", va="bottom",
            transform=ax.get_xaxis_transform())
    axg = ax.twinx()
    axg.plot(range(1, L + 1), gains, color=ACCENT, marker="o", ms=3, lw=1,
             label="gain Δ_l = D_{l-1} - D_l")
    axg.axhline(0, color=ACCENT, lw=0.5, alpha=0.5)
    axg.set_ylabel("per-layer gain Δ_l", color=ACCENT)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = axg.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3,
              fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10, pad=16)

    # panel 2 -------------------------------------------------------------
    ax2.plot(cost, benefit, color=INK, marker="o", ms=3, lw=1)
    for k, c, b in zip(cuts, cost, benefit):
        if k % 5 == 0 or k == eof:
            ax2.annotate(str(k), (c, b), fontsize=7, textcoords="offset points", xytext=(3, 3))
    if eof in cuts:
        i = cuts.index(eof)
        ax2.scatter([cost[i]], [benefit[i]], s=90, color=ACCENT, zorder=5, label=f"chosen eof={eof}")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("predicted training cost (relative to full fine-tuning)")
    ax2.set_ylabel("predicted benefit B(k)")
    ax2.set_title("cost vs benefit over cuts (labels: eof)", fontsize=10)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(path: Path, *, title: str, metric: str, full: dict, cut_points: list[dict],
                  picks: dict[str, dict]) -> Path:
    """Quality vs measured cost: every cut (mean ± spread), full FT, each selector's pick.

    cut_points: [{"cut", "cost", "quality", "spread"}]; picks: name -> {"cut", "cost", "quality"}.
    The frontier is the upper (accuracy) or lower (loss) envelope going from cheap to expensive.
    """
    higher_better = metric != "loss"
    pts = sorted(cut_points, key=lambda p: p["cost"])
    fig, ax = plt.subplots(figsize=(8, 5))
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
            alpha=0.5, label="frontier")
    # the band a safe cut must reach: full's noise (seed spread or test-row error) when known
    band = full.get("noise") if full.get("noise") is not None else (full.get("spread") or 0)
    ax.axhspan(full["quality"] - band, full["quality"] + band, color="#999", alpha=0.2, lw=0,
               label="full fine-tuning ± noise")
    ax.scatter([1.0], [full["quality"]], marker="s", s=60, color="#555", label="full fine-tuning",
               zorder=4)
    markers = "D^v<>ph*"
    for i, (name, p) in enumerate(sorted(picks.items())):
        if p.get("cost") is None or p.get("quality") is None:
            continue
        ax.scatter([p["cost"]], [p["quality"]], marker=markers[i % len(markers)], s=70, zorder=5,
                   label=f"{name} (eof={p['cut']})" if p.get("cut") is not None else
                   f"{name} ({len(p.get('layers') or [])} layers)", edgecolor="k", linewidth=0.5)
    ax.set_xlabel("training FLOPs relative to full fine-tuning")
    ax.set_ylabel(metric + (" (higher is better)" if higher_better else " (lower is better)"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)
