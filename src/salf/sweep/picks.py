"""Each selector's pick, from the sweep's analysis (OUT/analysis/trace.json) and the
baseline selectors, kept in OUT/analysis/picks.json."""

from __future__ import annotations

import time
from pathlib import Path

from ..io import atomic_write_json, read_json
from .settings import PREFIX_SELECTORS, SET_SELECTORS, SweepConfig, is_salf_policy, selector_dynamic_settings


def selector_picks(cfg: SweepConfig, progress: bool = True) -> tuple[dict, dict]:
    """Each selector's choice: {name: {"cut": k} or {"layers": [...]}} and the analysis timing.

    Picks are kept in OUT/analysis/picks.json: a resumed sweep reuses them instead of
    re-running the baseline selectors (gradient norms, weight spectra: minutes on a CPU),
    and computes only selectors it has not seen with these settings.
    """
    picks_path = Path(cfg.out) / "analysis" / "picks.json"
    settings = {"samples": cfg.samples, "max_length": cfg.max_length, "head": cfg.head,
                "batch_size": cfg.batch_size}
    saved = read_json(picks_path, "selector picks") if picks_path.exists() else {}
    known = saved.get("picks", {}) if saved.get("settings") == settings else {}
    load = Loaded(cfg)
    tr, cost, fresh = sweep_analysis(cfg, load, progress)
    if fresh:
        known = {}  # a new trace: nothing saved before it holds
    flops = [c["flops_ratio"] for c in cost["cuts"]]
    context = Loaded(cfg, lambda: baseline_context(cfg, load(), tr.num_layers))
    picks = {name: pick_of(name, cfg, tr, flops, known, context) for name in cfg.selectors}
    baseline = {n: p for n, p in picks.items() if n in PREFIX_SELECTORS or n in SET_SELECTORS}
    atomic_write_json(picks_path, {"settings": settings, "picks": {**known, **baseline}})
    timing = {"analysis_s": tr.timing.get("seconds"), "analysis_wall_s": tr.extra.get("analysis_wall_s")}
    return picks, timing


class Loaded:
    """What `make()` returns, made on first use only (default: the sweep's model, tokenizer,
    info and dataset, loaded only if something must be computed)."""

    def __init__(self, cfg: SweepConfig, make=None):
        self.make = make or (lambda: load_model_and_data(cfg))
        self.value = None

    def __call__(self):
        if self.value is None:
            self.value = self.make()
        return self.value


def load_model_and_data(cfg: SweepConfig) -> tuple:
    from ..data import load_dataset_spec
    from ..models import load_model

    return (*load_model(cfg.model), load_dataset_spec(cfg.dataset, **cfg.data_kwargs))


def sweep_analysis(cfg: SweepConfig, load: Loaded, progress: bool):
    """(trace, cost table, fresh): OUT/analysis/trace.json, analysed now (fresh) if missing."""
    from ..analysis import Trace
    from ..pipeline import analyze

    trace_path = Path(cfg.out) / "analysis" / "trace.json"
    if trace_path.exists():
        tr = Trace.from_json(trace_path)
        return tr, tr.extra["cost"], False
    model, tok, info, ds = load()
    t0 = time.perf_counter()
    res = analyze(cfg.model, cfg.dataset, out_dir=Path(cfg.out) / "analysis", samples=cfg.samples,
                  head=cfg.head, train_batch_size=cfg.batch_size,
                  train_max_length=cfg.max_length, loaded=(model, tok, info), dataset=ds,
                  progress=progress)
    tr = res.trace
    tr.extra["analysis_wall_s"] = time.perf_counter() - t0
    tr.to_json(trace_path)
    return tr, res.cost, True


def baseline_context(cfg: SweepConfig, loaded: tuple, num_layers: int):
    """The SelectorContext the baseline selectors read: the model and a seeded sample."""
    from ..data import make_batches, sample_rows
    from ..models import anatomy
    from ..selectors import SelectorContext

    model, tok, _, ds = loaded
    rows = sample_rows(ds.splits["train"], cfg.samples, 0, "selector sample")
    return SelectorContext(model=model, anat=anatomy(model), num_layers=num_layers, seed=0,
                           batches=lambda: iter(make_batches(ds.task, tok, rows, 8, cfg.max_length)))


def pick_of(name: str, cfg: SweepConfig, tr, flops: list[float], known: dict, context: Loaded) -> dict:
    """One selector's pick: a moving cut from the default policy's cut, a SALF policy's cut,
    a baseline's saved pick, or the baseline run now on `context()`."""
    from ..analysis import choose_cut
    from ..selectors import run_selector

    if selector_dynamic_settings(name) is not None:
        start = choose_cut(tr, cfg.default_selector, cost=flops)["eof"]
        return dynamic_pick(name, start, cfg.default_selector, selector_dynamic_settings(name))
    if is_salf_policy(name):
        choice = choose_cut(tr, name, cost=flops)
        return {"cut": choice["eof"], "reason": choice["reason"]}
    if name in known:
        return known[name]
    sel = run_selector(name, context())
    if sel.eof is not None:
        return {"cut": sel.eof, "reason": sel.reason}
    return {"layers": sorted(sel.trainable_layers), "reason": sel.reason}


def dynamic_pick(name: str, start: int, default_selector: str, settings: dict) -> dict:
    """A dyn-<policy> selector's pick: the default policy's static cut it starts from, and
    its settings."""
    return {"cut": start, "dynamic": settings, "selector": name,
            "reason": f"starts at {default_selector}'s eof {start}, moves while training"}


def picks_from_cells(cells: list[dict], known: dict, default_selector: str) -> dict:
    """The picks of selectors whose cells the folder holds but `known` lacks — cells trained
    in another folder (a side folder beside a locked one, another machine) and copied in —
    read from the cells themselves, so that no cell on disk is left out of the report."""
    found: dict = {}
    for c in cells:
        name = c.get("selector")
        if name in (None, "full") or name in known or name in found:
            continue
        settings = (c.get("dynamic") or {}).get("settings")
        if settings is not None:
            found[name] = dynamic_pick(name, c["cut"], default_selector, settings)
        elif c.get("layers") is not None:
            found[name] = {"layers": c["layers"], "reason": "read from its cells"}
        else:
            found[name] = {"cut": c["cut"], "reason": "read from its cells"}
    return found
