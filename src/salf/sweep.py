"""`salf sweep`: the oracle frontier and every selector's pick, measured the same way.

A sweep trains the model at each cut of a grid (and at each selector's pick),
with identical hyper-parameters, data order and test rows, for each seed, and
records held-out quality and measured cost. Each *cell* (one cut or selector
set, one seed) runs in its own subprocess, so its peak memory is its own and
a crash or kill loses only that cell; its result is written atomically to
OUT/cells/<key>.json and never recomputed. Rerunning the same command resumes.

Aggregates go to OUT/sweep.json (schema in docs/sweep.md), OUT/sweep.md and
OUT/frontier.png.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .choices import BASELINE_SELECTORS, CUT_POLICIES
from .defaults import DEFAULT_POLICY
from .distributed import launched, without_launcher
from .errors import SalfError
from .io import atomic_write_json, atomic_write_text, read_json

# SALF's cut policies, each a selector under its own name (budget=B too); `salf` stands for
# the default policy (salf.defaults.DEFAULT_POLICY), resolved when a sweep is configured.
DEFAULT_ALIAS = "salf"
PREFIX_SELECTORS = tuple(BASELINE_SELECTORS.names(kind="prefix", sweep=True))
SET_SELECTORS = tuple(BASELINE_SELECTORS.names(kind="set", sweep=True))
# Dynamic freezing: "dyn-<policy>" (salf.dynamic POLICIES), optionally with settings
# "dyn-salf:tau=0.2:epsilon=0.1"; every dynamic cell starts from the default policy's cut.
DYNAMIC_PREFIX = "dyn-"

# config.json's "version". Folders without one named max-gain "salf" and max-gain-e0
# "salf-e0"; salf renames them when it opens such a folder (upgrade_folder).
FOLDER_VERSION = 2
OLD_SELECTOR_NAMES = {"salf": "max-gain", "salf-e0": "max-gain-e0"}
# OUT/<this>: flock'ed by the sweep writing the folder, and holding its PID
LOCK_FILE = ".sweep.lock"


def is_salf_policy(name: str) -> bool:
    return name in CUT_POLICIES


def selector_dynamic_settings(name: str) -> dict | None:
    """The DynamicSettings (as a dict) a "dyn-<policy>[:key=value...]" selector runs (keys:
    DynamicSettings fields); None for a static selector. SalfError for an unknown policy or
    setting."""
    if not name.startswith(DYNAMIC_PREFIX):
        return None
    from .dynamic import DynamicSettings

    policy, *params = name[len(DYNAMIC_PREFIX):].split(":")
    kwargs: dict = {}
    for item in filter(None, params):
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value.strip()
    try:
        return DynamicSettings.from_dict({"policy": policy, **kwargs}).to_dict()
    except (SalfError, TypeError) as exc:
        raise SalfError(f"sweep selector {name!r}: {exc}") from None


def resolve_selectors(names: list[str], default: str) -> list[str]:
    """The selectors a sweep runs, in order: `salf` becomes the default policy `default`,
    repeats are dropped, unknown names are refused."""
    known = [*CUT_POLICIES.labels(), *BASELINE_SELECTORS.labels(sweep=True)]
    resolved: list[str] = []
    for name in names:
        name = default if name == DEFAULT_ALIAS else name
        if name in OLD_SELECTOR_NAMES:
            raise SalfError(f"sweep selector {name!r} is now {OLD_SELECTOR_NAMES[name]!r} "
                            f"(selectors are named after their policies; {DEFAULT_ALIAS!r} "
                            f"is the default policy, {default})")
        if is_salf_policy(name):  # read as `salf plan --policy` reads it (budget=B's B too)
            from .analysis.gains import parse_policy

            try:
                parse_policy(name)
            except SalfError as exc:
                raise SalfError(f"sweep selector {name!r}: {exc}") from None
        if not (is_salf_policy(name) or name in PREFIX_SELECTORS or name in SET_SELECTORS
                or selector_dynamic_settings(name) is not None):
            raise SalfError(f"unknown selector {name!r} for sweep; choose from {DEFAULT_ALIAS} "
                            f"(the default policy, {default}), {', '.join(known)}, "
                            f"{DYNAMIC_PREFIX}<policy>")
        if name not in resolved:
            resolved.append(name)
    return resolved


def parse_selectors(text: str) -> list[str]:
    """The sweep's --selectors: the names listed, or [] for 'none' (full fine-tuning and the
    --cuts cells only). An empty list is refused, as --cuts refuses one: it is more often a
    script's unset variable than a choice."""
    if text.strip().lower() == "none":
        return []
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise SalfError("--selectors names no selector; give 'none' for full fine-tuning and "
                        "the --cuts cells only")
    return names


def check_sweep_arguments(args) -> None:
    """The sweep's own checks of `salf sweep` arguments, before any model loads (from
    salf.checks.check_sweep): no launcher, --seeds in set_seed's range, every --selectors name
    known and its settings valid (budget=B, dyn-POLICY:key=value)."""
    from .checks import MAX_SEED, parse_int_list

    if launched():  # every rank would run the whole sweep, and its cells join no group
        raise SalfError("salf sweep runs its own cells, one process each: run `salf sweep "
                        "--jobs N` without torchrun or accelerate launch (this process has "
                        "a launcher's RANK/LOCAL_RANK/WORLD_SIZE)")
    bad = [s for s in parse_int_list(args.seeds, "--seeds") if not 0 <= s <= MAX_SEED]
    if bad:
        raise SalfError(f"--seeds must be integers from 0 to {MAX_SEED} (2**32 - 1, what "
                        f"transformers.set_seed accepts), got {bad[0]}")
    resolve_selectors(parse_selectors(args.selectors), DEFAULT_POLICY)


@dataclass
class SweepConfig:
    model: str
    dataset: str
    out: str
    cuts: list[int] | None = None            # None = every cut 0..L-1
    selectors: list[str] = field(
        default_factory=lambda: [DEFAULT_ALIAS, "max-gain", "paper", "onset", "freeze-half"])
    default_selector: str = DEFAULT_POLICY   # what `salf` meant when the folder was last run
    seeds: list[int] = field(default_factory=lambda: [1])
    steps: int = 120
    batch_size: int = 16
    max_length: int = 96
    lr: float = 5e-5
    test_samples: int = 1000
    samples: int = 256                       # SALF analysis examples
    head: str = "frozen"
    data_kwargs: dict = field(default_factory=dict)
    timeout_s: int | None = None             # per cell; None: no limit
    save_steps: int | None = None            # a cell's checkpoint interval (None: none); a
    #                                          rerun resumes an unfinished cell from it
    jobs: int = 1                            # cells run at once (not a training setting)

    def __post_init__(self):
        self.selectors = resolve_selectors(self.selectors, self.default_selector)

    def training_key(self) -> dict:
        """Settings every cell must share; a resumed sweep with other settings is refused."""
        return {k: getattr(self, k) for k in ("model", "dataset", "steps", "batch_size",
                                              "max_length", "lr", "test_samples", "head",
                                              "data_kwargs")}


# ------------------------------------------------------------------ cell = one training run
# A cell is one training run at one seed; its key is "<stem>-s<seed>", the stem saying
# what it trains. A new kind of cell adds a line to cell_kind, cell_stem and CELL_KEY.
CELL_KEY = re.compile(r"(?:full|cut(?P<cut>\d+)|set-(?P<layers>\d+(?:_\d+)*)"
                      r"|dyn-(?P<dyn>[a-z0-9.=_-]+?))-s(?P<seed>\d+)")


def cell_kind(item: dict) -> str:
    """What a cell (or a selector's pick) trains: "full" fine-tuning, a "cut" (the prefix
    up to it frozen), a layer "set" (only those layers trained) or "dyn" (a cut that moves
    during training, starting at item["cut"])."""
    if item.get("dynamic") is not None:
        return "dyn"
    if item.get("layers") is not None:
        return "set"
    return "full" if item.get("cut") is None else "cut"


def cell_stem(item: dict) -> str:
    """A cell's key without its seed: "full", "cut04", "set-0_1_18", "dyn-salf"."""
    kind = cell_kind(item)
    if kind == "cut":
        return f"cut{item['cut']:02d}"
    if kind == "set":
        return "set-" + "_".join(map(str, item["layers"]))
    if kind == "dyn":
        return re.sub(r"[^a-z0-9.=_-]+", "_", item["selector"].lower().replace(":", "-"))
    return kind


def cell_key(item: dict) -> str:
    """The name of the cell {"cut", "layers", "seed"} (its file is OUT/cells/<key>.json)."""
    return f"{cell_stem(item)}-s{item['seed']}"


def parse_cell_key(key: str) -> dict:
    """The cell a key names, as cell_key takes it: "full-s2" -> {"cut": None, "layers": None,
    "seed": 2}, "cut04-s1" -> cut 4, "set-0_1_18-s1" -> layers [0, 1, 18]."""
    m = CELL_KEY.fullmatch(key)
    if not m:
        raise SalfError(f"cell name {key!r} is not full-sN, cutKK-sN, set-A_B_..-sN or dyn-POLICY-sN")
    if m["dyn"] is not None:
        raise SalfError(f"cell {key!r} is a dynamic run: rerun it with `salf sweep --selectors "
                        f"dyn-...` (its start cut comes from the sweep)")
    return {"cut": int(m["cut"]) if m["cut"] is not None else None,
            "layers": [int(x) for x in m["layers"].split("_")] if m["layers"] else None,
            "seed": int(m["seed"])}


def cell_spec(cfg: SweepConfig, item: dict, cells_dir: Path) -> dict:
    """Everything one cell's subprocess needs: the item (cut/layers/selector/seed) + settings."""
    key = cell_key(item)
    return dict(item, key=key, model=cfg.model, dataset=cfg.dataset,
                data_kwargs=cfg.data_kwargs, steps=cfg.steps, batch_size=cfg.batch_size,
                max_length=cfg.max_length, lr=cfg.lr, test_samples=cfg.test_samples,
                head=cfg.head, work_dir=str(cells_dir / f".work-{key}"), save_steps=cfg.save_steps)


def run_cell(spec: dict) -> dict:
    """Train + evaluate one cell in this process; returns the result record."""
    import torch

    from .cost import ModelShape
    from .data import load_dataset_spec
    from .models import anatomy, load_model
    from .data import first_rows
    from .finetune import run_training
    from .plan import FreezePlan
    from .train import evaluate

    torch.set_num_threads(int(os.environ.get("SALF_THREADS", torch.get_num_threads())))
    model, tok, info = load_model(spec["model"])
    anat = anatomy(model)
    L = anat.num_layers
    model_dict = dict(info.to_dict(), tied=anat.tied)
    if spec["cut"] is None and spec.get("layers") is None:
        plan = FreezePlan.full(L, model=model_dict)
    elif spec.get("layers") is not None:
        layers = sorted(spec["layers"])
        plan = FreezePlan.manual(layers[0], L, head=spec["head"], model=model_dict,
                                 policy="set", layers=layers)
    else:
        plan = FreezePlan.manual(spec["cut"], L, head=spec["head"], model=model_dict)
    dynamic = None
    if spec.get("dynamic") is not None:
        from .dynamic import DynamicSettings

        dynamic = DynamicSettings.from_dict(spec["dynamic"])
    ds = load_dataset_spec(spec["dataset"], **spec.get("data_kwargs", {}))
    work = Path(spec["work_dir"])
    # an unfinished cell that saved checkpoints continues from its last one (bit-identical
    # to an uninterrupted run on one thread); otherwise a leftover folder is cleared
    save_steps = spec.get("save_steps")
    resume = bool(save_steps) and (work / "run.json").exists()
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    metrics = run_training(spec["model"], ds, plan, work, loaded=(model, tok, info),
                           eval_samples=0, seed=spec["seed"], progress=False,
                           max_steps=spec["steps"], batch_size=spec["batch_size"],
                           max_length=spec["max_length"], lr=spec["lr"], dynamic=dynamic,
                           save_steps=save_steps, save_total_limit=1, resume=resume)
    train_s = time.perf_counter() - t0
    rows = first_rows(ds, "test", spec["test_samples"])
    quality = evaluate(model, tok, ds.task, rows, batch_size=32, max_length=spec["max_length"])
    shutil.rmtree(work, ignore_errors=True)  # cells keep numbers, not 0.5 GB model copies
    kind = ds.task.kind
    moved = metrics.get("dynamic")
    cost = (1.0 if plan.is_full else moved["cost"]["flops_ratio"] if moved else
            cell_cost(ModelShape.from_model(model), plan.eof, plan.layers, spec, kind))
    mem = metrics.get("memory", {})
    peak = mem.get("cuda_peak_allocated_bytes") or mem.get("peak_rss_bytes")
    metric = "accuracy" if kind == "classification" else "loss"
    return {
        "key": spec["key"], "cut": spec["cut"], "layers": spec.get("layers"),
        "selector": spec.get("selector"), "seed": spec["seed"],
        "quality": quality[metric], "loss": quality["loss"],
        "accuracy": quality.get("accuracy"), "macro_f1": quality.get("macro_f1"),
        "label_loss": quality.get("label_loss"), "perplexity": quality.get("perplexity"),
        "loss_se": quality.get("loss_se"), "test_rows": quality.get("n"),
        "cost": cost, "cost_basis": "trained-layers",
        "step_s": metrics["timing"].get("median_step_s"),
        "peak_mb": peak / 2**20 if peak else None, "train_s": train_s,
        # a resumed cell's train_s covers the steps after this one only; steps_s_total is
        # the time of every step of the run (the probe reads included), across resumes
        "resumed_from_step": metrics.get("resumed_from_step"),
        "steps_s_total": metrics["timing"].get("steps_s_total"),
        "final_train_loss": metrics["train"].get("final_loss"),
        # per-step training loss: within the first epoch each batch is new to the model when
        # its loss is taken, so the curve is a held-out signal too (what a short probe sees)
        "train_loss_curve": [round(p["loss"], 5) for p in metrics["train"].get("loss_curve", [])],
        "trainable_params": metrics["params"].get("trainable"),
        "audit_ok": metrics["audit"]["ok"] and (not moved or moved["audit"]["ok"]),
        **({"dynamic": dynamic_record(moved)} if moved else {}),
    }


def dynamic_record(section: dict) -> dict:
    """What a dynamic cell keeps of metrics.json["dynamic"]: the settings, the schedule, the
    integrated cost and the probe's share, and every check with its decision."""
    decisions = {d["step"]: d for d in section["decisions"]}
    checks = [{"step": c["step"], "eof": c["eof"], "loss": c["loss"],
               "deviation": c["deviation"], "decision": decisions.get(c["step"], {}).get("reason")}
              for c in section["checks"]]
    return {"settings": section["settings"], "schedule": section["schedule"],
            "cost": section["cost"], "probe": section["probe"], "checks": checks}


def cell_process_env(env_extra: dict | None = None) -> dict:
    """A cell subprocess's environment: this process's without a launcher's variables (a cell
    is one process: it would wait for ranks that never come, or train under the launcher's
    engine unlike the sweep's other cells), the sweep's PID for die_with_parent, `env_extra`."""
    return dict(without_launcher(os.environ), PYTHONUNBUFFERED="1",
                SALF_SWEEP_PID=str(os.getpid()), **(env_extra or {}))


def run_cell_subprocess(spec: dict, cells_dir: Path, timeout_s: int | None,
                        env_extra: dict | None = None) -> dict:
    # the spec goes in the cell's work folder, which the cell's next run clears or resumes
    # from: one left by a killed sweep lies nowhere the folder's cells are read from
    spec_path = Path(spec["work_dir"]) / "spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "salf.sweep", str(spec_path)],
                          capture_output=True, text=True, timeout=timeout_s,
                          env=cell_process_env(env_extra))
    spec_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SalfError(f"sweep cell {spec['key']} failed: {tail}")
    result_path = cells_dir / f"{spec['key']}.json"
    return read_json(result_path, "sweep cell")


# ------------------------------------------------------------------ picks
def selector_picks(cfg: SweepConfig, progress: bool = True) -> tuple[dict, dict]:
    """Each selector's choice: {name: {"cut": k} or {"layers": [...]}} and the analysis timing.

    Picks are kept in OUT/analysis/picks.json: a resumed sweep reuses them instead of
    re-running the baseline selectors (gradient norms, weight spectra: minutes on a CPU),
    and computes only selectors it has not seen with these settings.
    """
    from .analysis import Trace, choose_cut
    from .models import anatomy, load_model
    from .data import make_batches, sample_rows
    from .pipeline import analyze
    from .selectors import SelectorContext, run_selector

    out = Path(cfg.out)
    trace_path = out / "analysis" / "trace.json"
    picks_path = out / "analysis" / "picks.json"
    settings = {"samples": cfg.samples, "max_length": cfg.max_length, "head": cfg.head,
                "batch_size": cfg.batch_size}
    saved = read_json(picks_path, "selector picks") if picks_path.exists() else {}
    known = saved.get("picks", {}) if saved.get("settings") == settings else {}
    loaded = None  # (model, tok, info, ds), loaded only if something must be computed

    def load():
        nonlocal loaded
        if loaded is None:
            from .data import load_dataset_spec

            loaded = (*load_model(cfg.model), load_dataset_spec(cfg.dataset, **cfg.data_kwargs))
        return loaded

    if trace_path.exists():
        tr = Trace.from_json(trace_path)
        cost = tr.extra["cost"]
    else:
        model, tok, info, ds = load()
        t0 = time.perf_counter()
        res = analyze(cfg.model, cfg.dataset, out_dir=out / "analysis", samples=cfg.samples,
                      head=cfg.head, train_batch_size=cfg.batch_size,
                      train_max_length=cfg.max_length, loaded=(model, tok, info), dataset=ds,
                      progress=progress)
        tr, cost = res.trace, res.cost
        tr.extra["analysis_wall_s"] = time.perf_counter() - t0
        tr.to_json(trace_path)
        known = {}  # a new trace: nothing saved before it holds
    flops = [c["flops_ratio"] for c in cost["cuts"]]
    picks, L = {}, tr.num_layers
    ctx = None
    for name in cfg.selectors:
        if selector_dynamic_settings(name) is not None:
            start = choose_cut(tr, cfg.default_selector, cost=flops)["eof"]
            picks[name] = {"cut": start, "dynamic": selector_dynamic_settings(name), "selector": name,
                           "reason": f"starts at {cfg.default_selector}'s eof {start}, moves while "
                                     "training"}
        elif is_salf_policy(name):
            choice = choose_cut(tr, name, cost=flops)
            picks[name] = {"cut": choice["eof"], "reason": choice["reason"]}
        elif name in known:
            picks[name] = known[name]
        else:
            if ctx is None:
                model, tok, _, ds = load()
                rows = sample_rows(ds.splits["train"], cfg.samples, 0, "selector sample")
                ctx = SelectorContext(model=model, anat=anatomy(model), num_layers=L, seed=0,
                                      batches=lambda: iter(make_batches(ds.task, tok, rows, 8,
                                                                        cfg.max_length)))
            sel = run_selector(name, ctx)
            if sel.eof is not None:
                picks[name] = {"cut": sel.eof, "reason": sel.reason}
            else:
                picks[name] = {"layers": sorted(sel.trainable_layers), "reason": sel.reason}
    baseline = {n: p for n, p in picks.items() if n in PREFIX_SELECTORS or n in SET_SELECTORS}
    atomic_write_json(picks_path, {"settings": settings, "picks": {**known, **baseline}})
    timing = {"analysis_s": tr.timing.get("seconds"), "analysis_wall_s": tr.extra.get("analysis_wall_s")}
    return picks, timing


# ------------------------------------------------------------------ the folder
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


# ------------------------------------------------------------------ the sweep
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


def run_sweep(cfg: SweepConfig, progress: bool = True, log=print,
              dry_run: bool = False) -> dict | None:
    """Train the cells `cfg` asks for that the folder lacks; report on every cell it holds.

    dry_run: compute the analysis and picks (both kept), list the cells, train nothing.
    The folder is locked meanwhile (folder_lock).
    """
    with folder_lock(Path(cfg.out)):
        return _run_sweep(cfg, progress, log, dry_run)


def _run_sweep(cfg: SweepConfig, progress: bool, log, dry_run: bool) -> dict | None:
    from .models import anatomy, load_model

    out = Path(cfg.out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    saved = read_json(cfg_path, "sweep config") if cfg_path.exists() else None
    if saved and saved.get("training") != cfg.training_key():
        raise SalfError(f"{out} holds a sweep with other training settings "
                        f"({saved.get('training')}); use another --out")
    folder = merged_config(upgrade_folder(out, saved)["config"] if saved else None, cfg)
    model, _, _ = load_model(cfg.model)
    L = anatomy(model).num_layers
    del model
    cuts = cfg.cuts if cfg.cuts is not None else list(range(L))
    bad = [k for k in cuts if not 0 <= k < L]
    if bad:
        raise SalfError(f"cuts {bad} are outside 0..{L - 1} for this {L}-layer model")
    picks, timing = selector_picks(folder, progress)  # cached: only new selectors cost time
    backfill_cells(cfg, cells_dir)
    todo = wanted_cells(cuts, cfg.selectors, picks, cfg.seeds)
    wanted = {cell_key(t) for t in todo}
    missing: dict[str, dict] = {}  # key -> spec, in todo order (seed by seed)
    for item in todo:
        key = cell_key(item)
        if key not in missing and not (cells_dir / f"{key}.json").exists():
            missing[key] = cell_spec(cfg, item, cells_dir)
        elif cell_kind(item) == "dyn":
            check_dynamic_cell(cells_dir / f"{key}.json", item)
    if dry_run:
        log(f"{len(wanted) - len(missing)} of the {len(wanted)} cells asked for are done; "
            f"{len(missing)} to train: {', '.join(missing) or 'none'}")
        for name, p in picks.items():
            log(f"  pick {name}: " + (f"eof {p['cut']}" if "cut" in p else
                                      "layers " + ",".join(map(str, p["layers"]))))
        return None
    atomic_write_json(cfg_path, {"version": FOLDER_VERSION, "training": cfg.training_key(),
                                 "config": asdict(folder)})
    from tqdm.auto import tqdm

    bar = tqdm(total=len(wanted), initial=len(wanted) - len(missing), desc="sweep cells",
               unit="cell", disable=not progress)

    def report() -> dict:
        # every finished cell in the folder, also those of earlier runs with other lists
        summary = summarize(folder, load_cells(cells_dir), picks, timing)
        atomic_write_json(out / "sweep.json", summary)
        return summary

    def finished(done: dict) -> None:
        log(f"  {done['key']}: quality {done['quality']:.4f}, cost {done['cost']:.3f}, "
            f"step {done['step_s'] or 0:.2f} s")
        bar.update(1)
        report()  # keep sweep.json current after each cell

    run_cells(list(missing.values()), cells_dir, cfg.timeout_s, cfg.jobs, finished,
              on_start=bar.set_postfix_str)
    bar.close()
    summary = report()
    write_sweep_report(out, summary)
    return summary


def check_dynamic_cell(path: Path, item: dict) -> None:
    """A finished dynamic cell counts only if it ran the settings asked for now (the defaults
    of a policy may have changed since)."""
    if not path.exists():
        return
    ran = (read_json(path, "sweep cell").get("dynamic") or {}).get("settings")
    if ran != item["dynamic"] or read_json(path, "sweep cell").get("cut") != item["cut"]:
        raise SalfError(f"{path} ran other dynamic settings or another start cut ({ran}) than "
                        f"{item['selector']} asks for now ({item['dynamic']}); name the selector "
                        "with its settings (dyn-POLICY:key=value:...) or use another --out")


def wanted_cells(cuts: list[int], selectors: list[str], picks: dict,
                 seeds: list[int]) -> list[dict]:
    """The cells a run asks for, seed by seed: full fine-tuning, every cut of the grid and
    each selector's pick the grid lacks (a cut off it; a layer set or a dynamic run, which
    the grid never has)."""
    items = []
    for seed in seeds:
        items.append(dict(cut=None, layers=None, selector="full", seed=seed))
        items += [dict(cut=k, layers=None, selector=None, seed=seed) for k in cuts]
        items += [dict(cut=picks[n].get("cut"), layers=picks[n].get("layers"), selector=n,
                       seed=seed, **({"dynamic": picks[n]["dynamic"]} if "dynamic" in picks[n] else {}))
                  for n in selectors
                  if cell_kind(picks[n]) != "cut" or picks[n].get("cut") not in cuts]
    return items


def cell_environments(jobs: int) -> list[dict]:
    """Environment overrides for `jobs` cells running at once: the CPU threads split between
    them (unless SALF_THREADS is set), and with several GPUs, cells spread over them."""
    if jobs <= 1:
        return [{}]
    envs = [{} for _ in range(jobs)]
    if "SALF_THREADS" not in os.environ:
        for e in envs:
            e["SALF_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if not gpus:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if len(gpus) > 1:
        for i, e in enumerate(envs):
            e["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
    return envs


def run_cells(specs: list[dict], cells_dir: Path, timeout_s: int | None, jobs: int, finished,
              on_start=lambda key: None) -> None:
    """Run cell subprocesses, `jobs` at a time, in the order given; `finished(result)` is
    called in this thread as each one ends. If a cell fails, no new cell starts, the ones
    running finish (and are kept), then the first failure is raised."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    envs = cell_environments(jobs)
    free = list(range(len(envs)))  # slots: each running cell holds one environment
    pending = list(specs)
    failure: Exception | None = None
    with ThreadPoolExecutor(max_workers=len(envs)) as pool:
        running = {}
        while pending or running:
            while pending and free and failure is None:
                spec, slot = pending.pop(0), free.pop(0)
                on_start(spec["key"])
                running[pool.submit(run_cell_subprocess, spec, cells_dir, timeout_s,
                                    envs[slot])] = slot
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                free.append(running.pop(fut))
                try:
                    finished(fut.result())
                except (SalfError, subprocess.TimeoutExpired) as e:
                    failure = failure or e
    if failure is not None:
        raise failure if isinstance(failure, SalfError) else SalfError(
            f"a sweep cell ran past --cell-timeout {timeout_s} s ({failure}); a rerun starts it "
            "again, or with --save-steps continues it from its last checkpoint")


def cell_cost(shape, cut: int, layers: list[int] | None, spec: dict, kind: str) -> float:
    """Predicted training FLOPs of a cut or a layer set relative to full fine-tuning
    (salf.cost). A layer set (Spectrum's) pays weight gradients and optimizer state only
    for its layers, and input-gradients down to its lowest one."""
    from .cost import cost_curve, layer_set_cost

    kw = dict(loss_positions="last" if kind == "classification" else "all", head=spec["head"])
    if layers is not None:
        return layer_set_cost(shape, layers, spec["max_length"], spec["batch_size"],
                              **kw)["flops_ratio"]
    return cost_curve(shape, spec["max_length"], spec["batch_size"], **kw)[cut]["flops_ratio"]


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
        from .data import load_dataset_spec
        from .data import first_rows

        ds = load_dataset_spec(cfg.dataset, **cfg.data_kwargs)
        n = len(first_rows(ds, "test", cfg.test_samples))
    if old_sets:
        from .analysis import Trace
        from .cost import ModelShape

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


# ------------------------------------------------------------------ sweep.json
SAFE_RULE = ("quality minus full fine-tuning's at the same seeds (paired) within full's noise "
             "(max of the seed std and the standard error on the test rows: binomial for "
             "accuracy, ratio-estimator for a mean loss) and >= 99% of full (<= 101% for loss)")

# What a pick's row in pick_details copies from its measurement, in sweep.json's order: a
# cut's from its frontier point, any other pick's (a layer set's) from its own cells.
CUT_PICK_FIELDS = ("quality", "spread", "cost", "safe", "seeds", "delta_vs_full")
OTHER_PICK_FIELDS = ("quality", "spread", "cost", "seeds", "delta_vs_full", "paired_seeds", "safe")


@dataclass(frozen=True)
class Reference:
    """Full fine-tuning as every other cell is judged against it (docs/sweep.md, "safe")."""
    by_seed: dict[int, float]   # its quality at each seed it ran
    quality: float              # the mean over those seeds
    noise: float                # noise_floor
    higher: bool                # accuracy; False for a loss


def _mean_spread(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def quality_metric(cells: list[dict]) -> str:
    """What a cell's quality is: "accuracy" (classification) or "loss" (SFT)."""
    return "loss" if cells and cells[0].get("accuracy") is None else "accuracy"


def group_cells(cells: list[dict]) -> dict[str, list[dict]]:
    """Cells by what they trained (cell_stem), each group in the order given."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(cell_stem(c), []).append(c)
    return groups


def full_row(full_cells: list[dict]) -> dict:
    q, s = _mean_spread([c["quality"] for c in full_cells])
    return {"quality": q, "spread": s, "cost": 1.0, "seeds": len(full_cells),
            "loss": _mean_spread([c["loss"] for c in full_cells])[0],
            "step_s": _mean_spread([c["step_s"] for c in full_cells if c["step_s"]])[0],
            "peak_mb": _mean_spread([c["peak_mb"] for c in full_cells if c["peak_mb"]])[0]}


def noise_floor(full_cells: list[dict], full: dict, higher: bool, test_samples: int) -> float:
    """Full fine-tuning's noise: its seed spread, and at least the standard error of its
    quality on the test rows (what one seed cannot show): binomial for accuracy, the
    ratio-estimator SE recorded by evaluate for a mean loss."""
    if not full_cells:
        return 0.0
    if higher and test_samples:
        n = full_cells[0].get("test_rows") or test_samples  # fewer when the split is smaller
        se = math.sqrt(max(full["quality"] * (1 - full["quality"]), 0.0) / n)
    else:
        se = _mean_spread([c["loss_se"] for c in full_cells if c.get("loss_se")])[0]
        se = 0.0 if math.isnan(se) else se
    return max(full["spread"], se)


def measure(group: list[dict]) -> dict:
    """Mean and spread over the seeds of one training configuration's cells."""
    q, s = _mean_spread([c["quality"] for c in group])
    # a static cut costs the same at every seed; a moving cut's schedule, hence cost, differs
    return {"cost": statistics.fmean(c["cost"] for c in group), "quality": q, "spread": s,
            "loss": _mean_spread([c["loss"] for c in group])[0],
            "step_s": _mean_spread([c["step_s"] for c in group if c["step_s"]])[0],
            "seeds": len(group)}


def judge(mine: list[dict], ref: Reference) -> dict:
    """The paired verdict on one configuration's cells. They are compared with full
    fine-tuning at the seeds they share with it (same data order, same test rows), so a
    run at fewer seeds than full is not judged against seeds it never saw."""
    paired = [c for c in mine if c["seed"] in ref.by_seed]
    base = statistics.fmean(ref.by_seed[c["seed"]] for c in paired) if paired else ref.quality
    delta = (statistics.fmean(c["quality"] for c in paired) if paired
             else _mean_spread([c["quality"] for c in mine])[0]) - base
    if not ref.by_seed:
        safe = None
    elif ref.higher:
        safe = delta >= -ref.noise and base + delta >= 0.99 * base
    else:
        safe = delta <= ref.noise and base + delta <= 1.01 * base
    return {"delta_vs_full": delta, "paired_seeds": sorted(c["seed"] for c in paired),
            "safe": safe}


def cut_points(groups: dict[str, list[dict]], ref: Reference) -> list[dict]:
    """The frontier: every measured cut, in order, with its measurement and verdict."""
    cuts = sorted((g for g in groups.values() if cell_kind(g[0]) == "cut"),
                  key=lambda g: g[0]["cut"])
    return [{"cut": g[0]["cut"], **measure(g), **judge(g, ref)} for g in cuts]


def pick_row(pick: dict, groups: dict[str, list[dict]], points: list[dict],
             cheapest: dict | None, ref: Reference) -> dict:
    """A selector's pick with what its cells measured (nothing while none has run)."""
    row = dict(pick)
    if cell_kind(pick) == "cut":
        measured = next((p for p in points if p["cut"] == pick["cut"]), None)
        fields = CUT_PICK_FIELDS
    else:
        group = groups.get(cell_stem(pick))
        measured = {**measure(group), **judge(group, ref)} if group else None
        fields = OTHER_PICK_FIELDS
    if measured:
        row.update({k: measured[k] for k in fields})
        if cheapest:
            row["cost_vs_cheapest_safe"] = measured["cost"] / cheapest["cost"]
    if cell_kind(pick) == "dyn" and groups.get(cell_stem(pick)):
        # each seed's cut schedule [[step, eof], ...] and the cost it integrates to ("cost": their mean)
        row["schedules"] = {str(c["seed"]): c["dynamic"]["schedule"] for c in groups[cell_stem(pick)]}
        row["costs"] = {str(c["seed"]): c["cost"] for c in groups[cell_stem(pick)]}
    return row


def cheapest_safe(points: list[dict]) -> dict | None:
    """The oracle's cut: the cheapest safe point of the frontier, what a selector should find."""
    safe = [p for p in points if p["safe"]]
    return min(safe, key=lambda p: p["cost"]) if safe else None


def oracle(cheapest: dict | None, noise: float) -> dict:
    return {"cheapest_safe_cut": cheapest["cut"] if cheapest else None,
            "cheapest_safe_cost": cheapest["cost"] if cheapest else None,
            "safe_rule": SAFE_RULE, "noise": noise}


def summarize(cfg: SweepConfig, cells: list[dict], picks: dict, timing: dict) -> dict:
    """sweep.json (schema in docs/sweep.md): full fine-tuning, every cell, the frontier of
    cuts with their paired verdicts, each selector's pick and the oracle's cheapest safe cut."""
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
    from .report.markdown import md_table
    from .report.plots import plot_frontier

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


def die_with_parent() -> None:
    """Have the kernel SIGKILL this cell when the sweep that started it dies, however it dies
    (a SIGKILL'ed sweep forwards nothing): an orphaned cell would train on, holding the device
    and its work folder while a rerun trains the same cell. Linux's PR_SET_PDEATHSIG, set here
    after exec: a preexec_fn is unsafe in a process with threads (run_cells has), and a
    polling thread needs the GIL, which a long native call holds. The signal comes when the
    thread that started the cell ends; run_cells' thread waits for the cell, so that is the
    sweep's death. A cell run by hand (no SALF_SWEEP_PID) is left alone."""
    parent = os.environ.get("SALF_SWEEP_PID")
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):  # the sweep died before the prctl: no signal will come
        raise SystemExit(1)


def _cell_main(spec_path: str) -> int:
    """Run the cell a spec file describes; its result goes beside its work folder (a sweep's
    OUT/cells/<key>.json)."""
    spec = read_json(spec_path, "sweep cell spec")
    result = run_cell(spec)
    atomic_write_json(Path(spec["work_dir"]).parent / f"{spec['key']}.json", result)
    return 0


if __name__ == "__main__":
    die_with_parent()
    try:
        raise SystemExit(_cell_main(sys.argv[1]))
    except SalfError as e:
        print(f"salf: error: {e}", file=sys.stderr)
        raise SystemExit(2)
