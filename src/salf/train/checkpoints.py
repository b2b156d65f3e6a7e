"""Trainer checkpoints: written atomically, checked before a resume, rotated, never lost.

    staged_checkpoint(run_dir, name)   the Trainer writes into tmp-<name>/<name>; renamed on success
    last_checkpoint(folder)            the newest complete checkpoint-N (staging never counts)
    checkpoint_problem(path)           why a checkpoint cannot be resumed from, or None
    resume_point(folder, callbacks)    the newest good checkpoint; damaged newer ones set aside
    rotate(folder, keep, protect)      delete all but the `keep` newest complete checkpoints

Under several processes rank 0 creates and publishes the staging folder; every rank writes
its part into it in between (its RNG state, its shards).
See docs/training.md ("Checkpoints and resume").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import distributed
from ..errors import SalfError
from ..io import atomic_write_json, disk_full_is_an_error, publish_dir
from . import extensions
from .progress import say

STATE_FILE = "salf_state.json"      # the callbacks' states (see salf.train.extensions)
TENSOR_FILE = "salf_tensors.safetensors"   # their tensors, named "<callback key>/<name>"
_CHECKPOINT = re.compile(r"^" + PREFIX_CHECKPOINT_DIR + r"-(\d+)$")
_STAGING = re.compile(r"^tmp-" + PREFIX_CHECKPOINT_DIR + r"-\d+$")
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "adapter_model.bin")
_RNG_FILE = "rng_state.pth"     # one process; several write rng_state_<rank>.pth each


def step_of(checkpoint: str | os.PathLike) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders, oldest first (staging folders and set-aside ones never match)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=step_of)


def last_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest complete checkpoint (staging folders are never complete)."""
    found = complete_checkpoints(folder)
    return str(found[-1]) if found else None


def clean_staging(folder: str | os.PathLike) -> None:
    """Remove half-written checkpoints a crash left behind (they were never published)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if _STAGING.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_checkpoint(run_dir: str, name: str, callbacks):
    """Yield a staging folder; the Trainer writes `name` inside it, the callbacks' states
    join it, and only then is it renamed to run_dir/name (a crash leaves no partial one; a
    full disk is one SalfError naming it). Rank 0 creates and publishes it, once every rank
    has written its part."""
    staging = os.path.join(run_dir, f"tmp-{name}")

    def create() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)

    def publish() -> None:
        written = os.path.join(staging, name)
        save_callback_states(written, callbacks)
        publish_dir(written, os.path.join(run_dir, name))
        shutil.rmtree(staging, ignore_errors=True)

    try:
        with disk_full_is_an_error(os.path.join(run_dir, name)):
            distributed.on_main(create)
            yield staging
            distributed.barrier()
            distributed.on_main(publish)
    except SalfError:
        # a full disk: the partial checkpoint goes (freeing its space); the earlier ones stay
        if distributed.is_main():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def rotate(folder: str | os.PathLike, keep: int | None, protect: str | os.PathLike | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the `keep` newest, never `protect` (the one this
    run resumed from: it stays until a later resume has a newer good one). Returns the deleted."""
    if keep is None:
        return []
    protect = Path(protect).resolve() if protect else None
    old = complete_checkpoints(folder)[:-keep]
    deleted = [p for p in old if p.resolve() != protect]
    for p in deleted:
        shutil.rmtree(p)
    return deleted


# ----------------------------------------------------------------------------- validation


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):   # parses the header, checks it covers the file exactly
            return None
    except Exception as exc:   # noqa: BLE001 - any failure means: not loadable
        return f"{path.name} is damaged ({_short(exc)})"


def _torch_file_problem(path: Path) -> str | None:
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():   # the numpy types the Trainer allows in rng_state.pth
            torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        return None
    except Exception as exc:   # noqa: BLE001
        return f"{path.name} cannot be loaded ({_short(exc)})"


def _weights_problem(ckpt: Path) -> str | None:
    present = [ckpt / name for name in _WEIGHTS if (ckpt / name).is_file()]
    if not present:
        return "no model weights"
    weights = present[0]
    if weights.name.endswith(".index.json"):
        return _index_problem(weights)
    if weights.suffix == ".safetensors":
        return _safetensors_problem(weights)
    return _torch_file_problem(weights)


def _index_problem(index: Path) -> str | None:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return f"{index.name} is damaged ({_short(exc)})"
    for shard in shards:
        if not (index.parent / shard).is_file():
            return f"shard {shard} is missing"
        problem = _safetensors_problem(index.parent / shard)
        if problem:
            return problem
    return None


def _json_problem(path: Path, required: tuple[str, ...]) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as exc:
        return f"{path.name} is not valid JSON ({_short(exc)})"
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    return f"{path.name} lacks {', '.join(missing)}" if missing else None


def _engine_problem(ckpt: Path, engine: str | None) -> str | None:
    """The model and optimizer states, in the layout of the engine that wrote them: FSDP's
    (distributed-checkpoint folders, or whole files), DeepSpeed's (the global_step folder
    that `latest` names), or the Trainer's own files (one process, DDP)."""
    if engine == "fsdp":
        for what, stem in (("model", "pytorch_model_fsdp"), ("optimizer", "optimizer")):
            if not ((ckpt / f"{stem}_0" / ".metadata").is_file() or (ckpt / f"{stem}.bin").is_file()):
                return f"no FSDP {what} state ({stem}_0/.metadata or {stem}.bin)"
        return None
    if engine == "deepspeed":
        tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else ""
        if not tag or not any((ckpt / tag).glob("*model_states.pt")):
            return "no DeepSpeed state (the global_step folder that `latest` names)"
        return None
    return _weights_problem(ckpt)


def _torch_files(engine: str | None, processes: int) -> list[str]:
    """The torch files a checkpoint holds: optimizer (unless the engine keeps its own),
    scheduler (unless DeepSpeed's), and one RNG state per process."""
    rng = [_RNG_FILE] if processes == 1 else [f"rng_state_{r}.pth" for r in range(processes)]
    own = {"fsdp": ["scheduler.pt"], "deepspeed": []}.get(engine, ["optimizer.pt", "scheduler.pt"])
    return own + rng


def checkpoint_problem(ckpt: str | os.PathLike, state_keys: tuple[str, ...] = (),
                       processes: int = 1, engine: str | None = None) -> str | None:
    """Why `ckpt` cannot be resumed from, or None. Checks what a crash or a full disk
    damages: weights loadable (safetensors header and size; FSDP's and DeepSpeed's states
    present), trainer_state.json, optimizer, scheduler and RNG files loadable (one per process
    of the run that wrote it), the callbacks' states present and their tensors loadable. There
    are no checksums: a flipped byte inside tensor data is not caught."""
    ckpt = Path(ckpt)
    checks = [lambda: _engine_problem(ckpt, engine),
              lambda: _json_problem(ckpt / "trainer_state.json", ("global_step", "log_history"))]
    for name in _torch_files(engine, processes):
        checks.append(lambda name=name: (f"{name} is missing" if not (ckpt / name).is_file()
                                         else _torch_file_problem(ckpt / name)))
    if state_keys:
        checks.append(lambda: _json_problem(ckpt / STATE_FILE, state_keys))
    if (ckpt / TENSOR_FILE).is_file():     # only callbacks that had tensors wrote one
        checks.append(lambda: _safetensors_problem(ckpt / TENSOR_FILE))
    for check in checks:
        problem = check()
        if problem:
            return problem
    return None


def _set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never deleted),
    so that neither resume nor rotation nor a new checkpoint of the same step touches it."""
    target = ckpt.with_name(f"damaged-{ckpt.name}")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"damaged-{ckpt.name}-{n}")
    os.replace(ckpt, target)
    return target


def resume_point(folder: str | os.PathLike, callbacks=(), processes: int = 1,
                 engine: str | None = None) -> str | None:
    """The newest checkpoint that passes `checkpoint_problem` (written by `processes`
    processes of `engine`) and whose states `callbacks` take back, or None if there is none
    at all.

    Damaged newer ones are named in one line each and set aside (damaged-checkpoint-N);
    if every checkpoint is damaged, one SalfError names them and nothing is renamed."""
    state_keys = tuple(extensions.stateful(callbacks))
    damaged = []
    for ckpt in reversed(complete_checkpoints(folder)):
        problem = (checkpoint_problem(ckpt, state_keys, processes, engine)
                   or callback_state_problem(ckpt, callbacks))
        if problem is None:
            for bad, why in damaged:
                kept = _set_aside(bad)
                say(f"salf: warning: --resume: {bad} is damaged ({why}); resuming from {ckpt.name} "
                    f"instead (the damaged one is kept as {kept.name})")
            return str(ckpt)
        damaged.append((ckpt, problem))
    if damaged:
        listed = "; ".join(f"{ckpt} ({why})" for ckpt, why in damaged)
        raise SalfError(f"--resume: no checkpoint can be resumed from: {listed}. Repair or remove "
                        f"them, or start a new run in another --out folder")
    return None


# ----------------------------------------------------------------------------- callback states


def save_callback_states(ckpt: str | os.PathLike, callbacks) -> None:
    """Write the stateful callbacks' `state_dict()`s (and `tensor_state_dict()`s) into the
    checkpoint (if any)."""
    states = {key: cb.state_dict() for key, cb in extensions.stateful(callbacks).items()}
    if states:
        atomic_write_json(Path(ckpt) / STATE_FILE, states)
    tensors = {f"{key}/{name}": t.detach().cpu().contiguous()
               for key, cb in extensions.with_tensors(callbacks).items()
               for name, t in cb.tensor_state_dict().items()}
    if tensors:
        from safetensors.torch import save_file

        save_file(tensors, str(Path(ckpt) / TENSOR_FILE))   # inside the staging folder


def callback_state_problem(ckpt: str | os.PathLike, callbacks) -> str | None:
    """Why `callbacks` cannot take back the states saved in `ckpt`, or None. Each is handed
    its state, as the resume hands it again later: a state of the wrong shape (a list that
    is a string, a key missing) is a damaged file like a truncated one, not a salf bug. A
    SalfError (a state saved under other settings) is the user's to see, and passes."""
    try:
        load_callback_states(ckpt, callbacks)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        return f"{STATE_FILE} does not load ({type(exc).__name__}: {_short(exc)})"
    return None


def load_callback_states(ckpt: str | os.PathLike, callbacks) -> None:
    """Hand each stateful callback the state it saved in `ckpt` (checked by resume_point),
    then its tensors ({} from a checkpoint written without them)."""
    stateful = extensions.stateful(callbacks)
    if stateful:
        states = json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8"))
        for key, cb in stateful.items():
            cb.load_state_dict(states[key])
    with_tensors = extensions.with_tensors(callbacks)
    if with_tensors:
        from safetensors.torch import load_file

        path = Path(ckpt) / TENSOR_FILE
        tensors = load_file(str(path)) if path.is_file() else {}
        for key, cb in with_tensors.items():
            cb.load_tensor_state_dict({name.split("/", 1)[1]: t for name, t in tensors.items()
                                       if name.startswith(key + "/")})
