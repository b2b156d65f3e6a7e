"""Cells: one training run each, at one seed. Their keys, what they train, their specs,
the cells a run asks for, and what a cell costs.

A cell's key is "<stem>-s<seed>", the stem saying what it trains. A new kind of cell adds a
line to cell_kind, cell_stem and CELL_KEY.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SalfError
from ..io import read_json
from .settings import SweepConfig

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


def check_dynamic_cell(path: Path, item: dict) -> None:
    """A finished dynamic cell counts only if it ran the settings asked for now (the defaults
    of a policy may have changed since; settings added later that its policy does not read
    do not count: DynamicSettings.meaning)."""
    from ..dynamic.settings import DynamicSettings

    if not path.exists():
        return
    cell = read_json(path, "sweep cell")
    ran = (cell.get("dynamic") or {}).get("settings")
    same = DynamicSettings.meaning(ran) == DynamicSettings.meaning(item["dynamic"])
    if not same or cell.get("cut") != item["cut"]:
        raise SalfError(f"{path} ran other dynamic settings or another start cut ({ran}) than "
                        f"{item['selector']} asks for now ({item['dynamic']}); name the selector "
                        "with its settings (dyn-POLICY:key=value:...) or use another --out")


def cell_cost(shape, cut: int, layers: list[int] | None, spec: dict, kind: str) -> float:
    """Predicted training FLOPs of a cut or a layer set relative to full fine-tuning
    (salf.cost). A layer set (Spectrum's) pays weight gradients and optimizer state only
    for its layers, and input-gradients down to its lowest one."""
    from ..cost import StepSettings, cost_curve, layer_set_cost

    step = StepSettings(spec["max_length"], spec["batch_size"],
                        loss_positions="last" if kind == "classification" else "all", head=spec["head"])
    if layers is not None:
        return layer_set_cost(shape, layers, step)["flops_ratio"]
    return cost_curve(shape, step)[cut]["flops_ratio"]
