"""Several processes: what the launcher told this one, and the few collectives salf needs.

`torchrun` and `accelerate launch` start one process per device and tell each its place in
RANK, LOCAL_RANK and WORLD_SIZE (accelerate also names its engine: ACCELERATE_USE_FSDP,
ACCELERATE_USE_DEEPSPEED). The engines themselves (DDP, FSDP2, DeepSpeed) are the Hugging Face
Trainer's, through accelerate; salf only decides who writes and hands rank 0's decisions on.

    world_size(), rank(), is_main()   this process's place (1, 0, True without a launcher)
    engine()                          "ddp", "fsdp", "deepspeed", or None (one process)
    device()                          the launcher's device: cuda:LOCAL_RANK, or cpu
    init()                            the process group, started the way the Trainer starts it
    barrier(), all_gather(obj)
    on_main(fn)                       fn() on rank 0 only; every rank gets its result or its SalfError
    from_main(obj)                    rank 0's obj on every rank (a decision all must share)
    whole_tensor(p)                   a parameter's full tensor (FSDP2 DTensor, ZeRO-3 partition)

See docs/multi-gpu.md.
"""

from __future__ import annotations

import os

from .errors import SalfError

ENGINE_NAMES = {"ddp": "DDP", "fsdp": "FSDP", "deepspeed": "DeepSpeed"}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


# What a launcher sets in each process it starts: torchrun (and accelerate launch of several
# processes, which runs it) its place and rendezvous; accelerate its engine's settings.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
                      "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "FSDP_")


def launched() -> bool:
    """Whether a launcher placed this process among others (torchrun, accelerate launch,
    deepspeed all set these; a shell seldom does). MASTER_ADDR alone is no sign: cluster
    scripts export it for the launcher they then call."""
    return any(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def without_launcher(env: dict) -> dict:
    """`env` less every launcher variable: for a process salf starts itself, which would
    otherwise wait to join the launcher's process group, or train under its engine."""
    return {k: v for k, v in env.items()
            if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)}


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def engine() -> str | None:
    """The data-parallel engine this run was launched for (None: one process)."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp" if world_size() > 1 else None


def sharded() -> bool:
    """Whether the engine holds parameters in shards (FSDP, DeepSpeed), not whole replicas."""
    return engine() in ("fsdp", "deepspeed")


def device():
    """The device the launcher gives this process: cuda:LOCAL_RANK where CUDA is, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _active() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def init() -> None:
    """Start the process group of a launched run (nothing for one process), as the Trainer's
    TrainingArguments will: accelerate's PartialState (gloo on CPU, nccl on CUDA; the device
    set to cuda:LOCAL_RANK). The Trainer later finds it started and uses it."""
    import torch

    if world_size() > 1 and not _active():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


def finish() -> None:
    """End a launched run's process group once every rank is done with it. A rank that exits
    with its group alive can take down a peer still tearing its own down: gloo's transport
    thread sees the closed connection and aborts that process (SIGABRT)."""
    if _active():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a one-element list for one process)."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn):
    """fn() on rank 0 only (the writer of the run's files); every rank returns its result, and
    a SalfError it raises is raised on every rank, so that none waits for the others."""
    if not _active():
        return fn()
    import torch.distributed as dist

    box = [None]
    if is_main():
        try:
            box = [("ok", fn())]
        except SalfError as exc:
            box = [("error", str(exc))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise SalfError(value)
    return value


def whole_tensor(p):
    """A parameter's full tensor (a collective for a sharded one): FSDP2 shards are
    DTensors, ZeRO-3 partitions have ds_id."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return p.full_tensor()
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()
    return p


def from_main(obj):
    """Rank 0's `obj` on every rank (obj itself for one process): a decision every rank must
    take alike, such as where a moving cut goes, whatever each rank measured."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def refuse_sharded_dynamic() -> None:
    """One line naming the engine: a moving cut runs in one process or under DDP, not under
    an engine that shards the optimizer states (docs/multi-gpu.md §5)."""
    if sharded():
        name = ENGINE_NAMES[engine()]
        raise SalfError(f"--dynamic runs in one process or under DDP: under {name} a moved cut would "
                        f"leave {name}'s optimizer shards built for the old trainable set; launch "
                        "with torchrun (DDP) or without a launcher")
