"""Cost model: predicted training FLOPs, memory traffic, peak memory and step time per cut.

A cut k (0..L) freezes the embeddings and decoder layers 1..k and trains layers
k+1..L (plus the head when the plan says so). "Full" fine-tuning trains
everything, embeddings included, and is the reference every ratio is taken
against. Every formula, constant and what is and is not counted is written
down in docs/cost-model.md; the short version:

* matmul FLOPs (what `torch.utils.flop_counter.FlopCounterMode` counts):
  forward of layer l over N = B·T tokens is 2·P_l·N + 4·N·T·H·d_h (P_l = the
  layer's 2-D weights, the second term is QKᵀ and AV); the backward of a
  trainable layer is twice its forward (input-gradient + weight-gradient);
  nothing below the lowest trainable layer has any backward; the head costs
  2·d·V per loss position forward, the same again for its input-gradient
  (when anything below it trains) and again for its weight-gradient (when it
  trains).
* memory traffic (bytes streamed through DRAM/HBM by memory-bound ops): the
  elementwise work of every layer, the cross-entropy over the logits, the
  optimizer update (bytes per trainable parameter depend on the optimizer's
  implementation) and the dense embedding gradient; on a CPU, additionally
  the page faults of large (>= 32 MiB) tensors freshly allocated every step.
* peak memory: weights + gradients + optimizer states of trainable
  parameters + activations saved by trainable layers (per-token constants
  measured on transformers' Llama) + the logits/loss workspace.
* step time = matmul FLOPs / matmul throughput + streamed bytes / bandwidth
  + page-faulted bytes / page-fault bandwidth, with a `Machine` profile.

The code follows the same split: `StepSettings` holds and checks a step's settings
(`StepSettings.check` against the model, once per call), `_cut` says what one cut
trains, one short function computes each part (`_matmul_flops`, `_trainable_params`,
`_other_flops`, `_bytes_moved`, `_page_faulted_bytes`, `_peak_memory`, `_step_time`)
and `_cost` gathers them into one entry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, MISSING, asdict, dataclass, field, fields, replace

from .errors import SalfError
from .plan import check_head

# ---------------------------------------------------------------------------------------
# Constants (each one is explained in docs/cost-model.md)

#: Non-matmul FLOPs per parameter of one optimizer step (AdamW: decay 2, first
#: moment 3, second moment 4, sqrt/bias-correction/eps 3, update 2).
OPTIMIZER_FLOPS_PER_PARAM = {"adamw": 14, "adam": 12, "sgd-momentum": 5, "sgd": 2}
#: Optimizer states per trainable parameter (each the parameter's dtype, as torch keeps them).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}
#: Words streamed per parameter by one optimizer step, by implementation.
#: torch's single-tensor AdamW (the CPU default): decay r/w 2, lerp 3, mul_+addcmul_ 5,
#: sqrt 2, div 2, add_ 2, addcdiv_ 4 = 20, plus 2 freshly allocated temporaries (sqrt, div).
#: Fused AdamW (one kernel): read p, g, m, v, write p, m, v = 7, no temporaries.
OPTIMIZER_WORDS = {
    "single-tensor": {"adamw": 20, "adam": 18, "sgd-momentum": 7, "sgd": 3},
    "foreach": {"adamw": 20, "adam": 18, "sgd-momentum": 7, "sgd": 3},
    "fused": {"adamw": 7, "adam": 7, "sgd-momentum": 5, "sgd": 3},
}
OPTIMIZER_TEMPORARIES = {"single-tensor": {"adamw": 2, "adam": 2}, "foreach": {"adamw": 2, "adam": 2},
                         "fused": {}}
#: Cross-entropy over V logits per loss position: non-matmul FLOPs (max, exp, sum, log,
#: gather forward; softmax-minus-onehot backward).
CE_FLOPS_PER_LOGIT = 6
#: Bytes streamed per logit by the loss (fp32 upcast for low-precision models, log_softmax
#: forward r/r/w, nll grad zero-fill, log_softmax backward r/r/r/w, downcast of the grad).
CE_BYTES_PER_LOGIT_FP32 = 32
CE_BYTES_PER_LOGIT_EXTRA_LOWP = 12
#: Elementwise elements read+written per token by one layer's forward (eager Llama: two
#: RMSNorms ~8d each, rotary ~12 per q/k element, transposes/contiguous ~4d, residual adds
#: 6d, SiLU·mul 5·ff). The backward of a trainable layer streams twice as much.
EW_PER_D, EW_PER_KV, EW_PER_FF_GATED, EW_PER_FF_PLAIN = 38, 12, 5, 3
#: Peak logits/loss workspace per logit, beyond the logits' own dtype: log_softmax output,
#: its gradient and the logits gradient, all fp32 (HF upcasts the logits for the loss).
LOGITS_WORKSPACE_FP32_COPIES = 3


def activation_bytes_per_token(shape: "ModelShape", seq_len: int, dtype_bytes: int,
                               attention: str = "sdpa") -> float:
    """Bytes saved for backward per token by one trainable decoder layer.

    Measured with `torch.autograd.graph.saved_tensors_hooks` on transformers' Llama
    (5.x, fp32 and bf16; tests/test_cost.py re-measures it):
      sdpa : d·(6b+8) + 4·ff·b + 2·kv·b + 4·H + 8
      eager: d·(8b+8) + 4·ff·b + H·T·(4 + b if b < 4 else 4) + 8
    (the "+8 per d" are fp32 copies inside the RMSNorms; 4·ff = gate, SiLU(gate), up,
    product; eager also keeps the softmax probabilities). Non-gated MLPs save 2·ff.
    """
    d, ff, b = shape.hidden_size, shape.intermediate_size, dtype_bytes
    ff_words = 4 if shape.gated_mlp else 2
    if attention == "eager":
        probs = shape.num_heads * seq_len * (4 + (b if b < 4 else 0))
        return d * (8 * b + 8) + ff_words * ff * b + probs + 8
    return d * (6 * b + 8) + ff_words * ff * b + 2 * shape.kv_dim * b + 4 * shape.num_heads + 8


# ---------------------------------------------------------------------------------------
# Model shape

_NON_GATED = {"gpt2", "gpt_neox", "opt", "phi", "falcon", "gptj", "bloom", "gpt_bigcode"}
_INPUT_PROJ_HINTS = ("q_proj", "k_proj", "v_proj", "qkv", "c_attn", "query_key_value", "wqkv",
                     "query", "key", "value")


@dataclass
class ModelShape:
    """What the cost model needs to know about a model, serialisable to a dict.

    `layer_params` are the exact parameter counts per decoder layer,
    `layer_matmul_params` the 2-D weights among them (the matmul FLOPs),
    `linear_shapes` the (name, in, out) of decoder layer 1's linear maps (LoRA
    targets). `total_params` counts every distinct parameter (a tied head once).
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool
    embedding_params: int
    head_params: int
    final_norm_params: int
    layer_params: list[int]
    layer_matmul_params: list[int]
    linear_shapes: list[list] = field(default_factory=list)
    total_params: int = 0
    gated_mlp: bool = True
    model_type: str | None = None
    source: str = "config"

    def __post_init__(self):
        if len(self.layer_params) != self.num_layers or len(self.layer_matmul_params) != self.num_layers:
            raise SalfError(f"model shape: {self.num_layers} layers but {len(self.layer_params)} "
                            "per-layer parameter counts")
        if not self.total_params:
            self.total_params = (self.embedding_params + sum(self.layer_params) + self.final_norm_params
                                 + (0 if self.tied else self.head_params))

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def unembedding_params(self) -> int:
        """V·d: the head's weight matrix (what an untied copy adds)."""
        return self.vocab_size * self.hidden_size

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """The shape of a model from its (transformers) config alone: Llama-style formulas."""
        from .models.config import config_value, text_config

        c = text_config(config)
        model_type = getattr(c, "model_type", None)
        d = config_value(c, "hidden_size", "n_embd", "d_model")
        L = config_value(c, "num_hidden_layers", "n_layer", "num_layers")
        H = config_value(c, "num_attention_heads", "n_head")
        V = config_value(c, "vocab_size")
        if not all(isinstance(x, int) and x > 0 for x in (d, L, H, V)):
            raise SalfError(f"cannot read the model shape from config {type(config).__name__}: "
                            "need hidden size, layer count, attention heads and vocab size")
        if getattr(c, "multi_query", False) and not getattr(c, "new_decoder_architecture", False):
            kv = 1
        else:
            kv = config_value(c, "num_key_value_heads", "num_kv_heads", default=H)
        hd = config_value(c, "head_dim", default=d // H)
        gated = model_type not in _NON_GATED
        ff = config_value(c, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * d
        bias = bool(config_value(c, "attention_bias", "bias",
                                 default=model_type in ("gpt2", "opt", "gpt_neox")))
        mlp_bias = bool(config_value(c, "mlp_bias", default=model_type in _NON_GATED and bias))
        lin = [["q_proj", d, H * hd], ["k_proj", d, kv * hd], ["v_proj", d, kv * hd],
               ["o_proj", H * hd, d]]
        if gated:
            lin += [["gate_proj", d, ff], ["up_proj", d, ff], ["down_proj", ff, d]]
        else:
            lin += [["fc_in", d, ff], ["fc_out", ff, d]]
        matmul = sum(i * o for _, i, o in lin)
        biases = (2 * H * hd + 2 * kv * hd if bias else 0) + ((ff + d) if mlp_bias else 0)
        norms = 2 * d * (2 if model_type in _NON_GATED else 1)     # LayerNorm has a bias
        tied = bool(getattr(c, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True)))
        emb = V * d
        if model_type in ("gpt2", "opt"):
            emb += config_value(c, "n_positions", "max_position_embeddings", default=0) * d
        return cls(num_layers=L, hidden_size=d, intermediate_size=ff, num_heads=H, num_kv_heads=kv,
                   head_dim=hd, vocab_size=V, tied=tied, embedding_params=emb, head_params=V * d,
                   final_norm_params=d * (2 if model_type in _NON_GATED else 1),
                   layer_params=[matmul + biases + norms] * L, layer_matmul_params=[matmul] * L,
                   linear_shapes=lin, gated_mlp=gated, model_type=model_type, source="config")

    @classmethod
    def from_model(cls, model) -> "ModelShape":
        """Exact parameter counts from a loaded model (preferred over `from_config`)."""
        from torch import nn

        from .models.anatomy import anatomy

        anat = anatomy(model)
        base = cls.from_config(model.config)
        layer_params, layer_matmul = [], []
        for layer in anat.layers:
            ps = list(layer.parameters())
            layer_params.append(sum(p.numel() for p in ps))
            layer_matmul.append(sum(p.numel() for p in ps if p.dim() == 2))
        linear_shapes = []
        for name, mod in anat.layers[0].named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, nn.Embedding) or w is None or w.dim() != 2:
                continue
            if isinstance(mod, nn.Linear):
                linear_shapes.append([name, mod.in_features, mod.out_features])
            elif hasattr(mod, "nf"):        # transformers' Conv1D (GPT-2): weight is (in, out)
                linear_shapes.append([name, int(w.shape[0]), int(w.shape[1])])
        emb_ids = set()
        emb = 0
        for m in anat.embeddings:
            for p in m.parameters():
                if id(p) not in emb_ids:
                    emb_ids.add(id(p))
                    emb += p.numel()
        head_params = sum(p.numel() for p in anat.head.parameters())
        norm = sum(p.numel() for p in anat.final_norm.parameters()) if anat.final_norm is not None else 0
        norm += sum(p.numel() for m in anat.post_norm for p in m.parameters())
        V, d = anat.unembedding.shape
        return cls(num_layers=anat.num_layers, hidden_size=int(d), intermediate_size=base.intermediate_size,
                   num_heads=base.num_heads, num_kv_heads=base.num_kv_heads, head_dim=base.head_dim,
                   vocab_size=int(V), tied=anat.tied, embedding_params=emb, head_params=head_params,
                   final_norm_params=norm, layer_params=layer_params, layer_matmul_params=layer_matmul,
                   linear_shapes=linear_shapes, total_params=sum(p.numel() for p in model.parameters()),
                   gated_mlp=base.gated_mlp, model_type=base.model_type, source="model")

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelShape":
        if not isinstance(data, dict):
            raise SalfError("model shape: expected a JSON object")
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise SalfError(f"model shape is missing {', '.join(missing)}; re-run `salf analyze`")
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------
# Machines

@dataclass
class Machine:
    """A throughput profile: what turns FLOPs and bytes into seconds.

    `page_fault_bytes_per_s`: rate at which freshly allocated large tensors
    (>= `large_alloc_bytes`) are first touched; glibc returns such blocks to the
    OS on free, so on a CPU every step pays the page faults again. None on GPUs
    (the caching allocator reuses memory).
    """

    name: str
    matmul_flops_per_s: float
    bytes_per_s: float
    page_fault_bytes_per_s: float | None = None
    large_alloc_bytes: int = 32 * 2**20
    optimizer_impl: str = "fused"
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


#: Presets. GPUs: bf16 dense peak x 0.6 (eager PyTorch matmul efficiency) and HBM peak x 0.85.
#: CPU: the 2-core AVX-512 Xeon this project is developed on, fp32, measured with
#: `measure_machine()` (matmuls of layer shapes 184-300 GFLOP/s, in-place streams 39-56 GB/s,
#: first touch of fresh 100 MB tensors 1-4 GB/s).
MACHINES: dict[str, Machine] = {
    "cpu": Machine("cpu", 200e9, 20e9, 1.5e9, optimizer_impl="single-tensor",
                   note="2-core AVX-512 Xeon, fp32, torch single-tensor AdamW"),
    "h100": Machine("h100", 0.6 * 989e12, 0.85 * 3.35e12, None, optimizer_impl="fused",
                    note="H100 SXM bf16 dense peak x0.6, HBM3 x0.85, fused AdamW"),
    "h200": Machine("h200", 0.6 * 989e12, 0.85 * 4.8e12, None, optimizer_impl="fused",
                    note="H200 bf16 dense peak x0.6, HBM3e x0.85, fused AdamW"),
    "a100": Machine("a100", 0.6 * 312e12, 0.85 * 2.0e12, None, optimizer_impl="fused",
                    note="A100 80GB bf16 dense peak x0.6, HBM2e x0.85, fused AdamW"),
}
MACHINES["gpu"] = MACHINES["h100"]


def get_machine(machine: "str | Machine | dict | None" = "auto") -> Machine:
    """A `Machine` from a preset name, a dict, or "auto" (this process's device)."""
    if isinstance(machine, Machine):
        return machine
    if isinstance(machine, dict):
        return Machine(**machine)
    if machine in (None, "auto"):
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).lower()
            for key in ("h200", "h100", "a100"):
                if key in name:
                    return MACHINES[key]
            return MACHINES["gpu"]
        return MACHINES["cpu"]
    if machine not in MACHINES:
        raise SalfError(f"unknown machine {machine!r}; choose from auto, {', '.join(MACHINES)}")
    return MACHINES[machine]


def measure_machine(name: str = "measured", repeats: int = 3) -> Machine:
    """Time a layer-shaped matmul, an in-place stream and a fresh large allocation here.

    Takes about a second on a CPU. The optimizer implementation is the one torch
    picks by default on this device (single-tensor on CPU, foreach on CUDA).
    """
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    m, k, n = (8192, 4096, 4096) if cuda else (1024, 1024, 2048)
    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(k, n, device=dev, dtype=dtype)
    flops = 2 * m * k * n / best(lambda: a @ b)
    numel = 2**28 if cuda else 2**25          # 128 MiB of fp32 on a CPU: above glibc's mmap threshold
    x = torch.rand(numel, device=dev, dtype=dtype) + 1
    y = torch.empty_like(x)
    t_out = best(lambda: torch.sqrt(x, out=y))  # read + write into reused memory
    bw = 2 * numel * x.element_size() / t_out
    pf = None
    if not cuda:                                 # the same op into a fresh (page-faulting) tensor
        t_fresh = best(lambda: torch.sqrt(x))
        pf = numel * x.element_size() / max(t_fresh - t_out, 1e-9)
    return Machine(name, flops, bw, pf, optimizer_impl="foreach" if cuda else "single-tensor",
                   note=f"measured on {dev}")


# ---------------------------------------------------------------------------------------
# The settings of one training step

@dataclass(frozen=True)
class StepSettings:
    """One training step's settings: what `cost_curve`, `layer_set_cost` and
    `schedule_cost` take. A bad value raises a one-line SalfError naming it when the
    settings are made; `check(shape)` checks them against a model once per call.

    `lora_targets`: the targeted linear maps (names; None or "all-linear": every one);
    `machine`: a preset name, "auto", a dict or a `Machine`. The checked copy holds
    them resolved: the targets as (name, in, out) of one layer (empty without LoRA),
    the machine as a `Machine`.
    """

    seq_len: int
    batch_size: int
    loss_positions: str | int = "all"
    optimizer: str = "adamw"
    dtype_bytes: int = 4
    head: str = "frozen"
    lora_rank: int | None = None
    gradient_checkpointing: bool = False
    _: KW_ONLY
    lora_targets: str | tuple | None = None
    attention: str = "sdpa"
    machine: str | Machine | dict | None = "auto"

    def __post_init__(self):
        _check_values(self)
        if isinstance(self.lora_targets, (list, set, frozenset)):      # frozen all the way down
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @classmethod
    def of(cls, step: "StepSettings | int | None" = None, batch_size: int | None = None,
           **settings) -> "StepSettings":
        """`step` itself when it is a StepSettings; else the settings of the loose form the
        cost functions also take: (seq_len, batch_size, **settings), by position or name."""
        if isinstance(step, cls):
            if batch_size is not None or settings:
                raise TypeError("give the step's settings as a StepSettings or as arguments, not both")
            return step
        for name, value in (("seq_len", step), ("batch_size", batch_size)):
            if value is not None:
                if name in settings:
                    raise TypeError(f"got multiple values for argument {name!r}")
                settings[name] = value
        return cls(**settings)

    def check(self, shape: ModelShape) -> "StepSettings":
        """These settings checked against `shape`, the LoRA targets and the machine resolved
        (what the cost of one step reads), or a one-line SalfError."""
        check_head(self.head, shape.tied, context="cost model")
        targets = _lora_targets(shape, self.lora_targets) if self.lora_rank is not None else ()
        return replace(self, lora_targets=targets, machine=get_machine(self.machine))

    @property
    def tokens(self) -> int:
        """N = B·T."""
        return self.batch_size * self.seq_len

    @property
    def loss_tokens(self) -> int:
        """N_h: the positions the loss (and the head) sees."""
        if self.loss_positions == "all":
            return self.tokens
        per_sequence = 1 if self.loss_positions == "last" else min(self.loss_positions, self.seq_len)
        return self.batch_size * per_sequence

    @property
    def optimizer_impl(self) -> str:
        impl = self.machine.optimizer_impl
        return impl if impl in OPTIMIZER_WORDS else "fused"


def _check_values(s: StepSettings) -> None:
    """The checks that need no model (the head's tied-weights rule is `StepSettings.check`'s)."""
    if not (isinstance(s.seq_len, int) and s.seq_len > 0 and isinstance(s.batch_size, int) and s.batch_size > 0):
        raise SalfError(f"cost model: seq_len and batch_size must be positive integers, got "
                        f"{s.seq_len!r} and {s.batch_size!r}")
    if s.loss_positions not in ("all", "last") and not (isinstance(s.loss_positions, int) and s.loss_positions > 0):
        raise SalfError(f"cost model: loss_positions must be 'all', 'last' or a positive count, "
                        f"got {s.loss_positions!r}")
    if s.optimizer not in OPTIMIZER_STATES:
        raise SalfError(f"cost model: unknown optimizer {s.optimizer!r}; choose from "
                        f"{', '.join(OPTIMIZER_STATES)}")
    if s.dtype_bytes not in (1, 2, 4, 8):
        raise SalfError(f"cost model: dtype_bytes must be 1, 2, 4 or 8, got {s.dtype_bytes!r}")
    check_head(s.head, None, context="cost model")
    if s.lora_rank is not None and not (isinstance(s.lora_rank, int) and s.lora_rank > 0):
        raise SalfError(f"cost model: lora_rank must be a positive integer, got {s.lora_rank!r}")
    if s.attention not in ("sdpa", "eager", "causal"):
        raise SalfError(f"cost model: attention must be 'sdpa', 'eager' or 'causal', got {s.attention!r}")


def _is_input_projection(name: str) -> bool:
    last = name.split(".")[-1].lower()
    return any(h == last or last.startswith(h) for h in _INPUT_PROJ_HINTS)


def _lora_targets(shape: ModelShape, targets) -> tuple[tuple[str, int, int], ...]:
    if targets in (None, "all-linear"):
        chosen = shape.linear_shapes
    else:
        wanted = {t if isinstance(t, str) else t[0] for t in targets}     # names, or resolved (name, in, out)
        chosen = [s for s in shape.linear_shapes if s[0].split(".")[-1] in wanted or s[0] in wanted]
        if not chosen:
            raise SalfError(f"cost model: no LoRA target among {sorted(wanted)} in this model's layers "
                            f"({', '.join(s[0] for s in shape.linear_shapes)})")
    return tuple((name, i, o) for name, i, o in chosen)


# ---------------------------------------------------------------------------------------
# What one step trains

@dataclass(frozen=True)
class _Cut:
    """The trained part of the model in one step: full fine-tuning, a cut k, or a layer set."""

    full: bool
    eof: int                        # the lowest layer the backward reaches (0 for full FT)
    num_layers: int
    trainable_layers: Sequence[int]
    lora: bool
    head_trains: bool               # the head's weight, or an untied copy of it
    head_copy: bool                 # an untied copy adds V x d parameters
    norm_trains: bool

    @property
    def traversed(self) -> range:
        """The layers the backward pass goes through."""
        return range(self.eof, self.num_layers)

    @property
    def n_train(self) -> int:
        return len(self.trainable_layers)

    @property
    def n_back(self) -> int:
        return self.num_layers - self.eof

    @property
    def below_head_trains(self) -> bool:
        """Whether the head's input-gradient is needed."""
        return self.n_train > 0 or self.norm_trains


def _cut(shape: ModelShape, s: StepSettings, k: int | None, layers=None) -> _Cut:
    """k=None is full fine-tuning. layers: a trainable set with min(layers) = k (Spectrum's
    kind of plan); the others above k stay frozen but pass the gradient down to layer k."""
    full = k is None
    eof = 0 if full else k
    lora = s.lora_rank is not None and not full
    return _Cut(full=full, eof=eof, num_layers=shape.num_layers,
                trainable_layers=(range(eof, shape.num_layers) if full or layers is None
                                  else sorted(layers)),
                lora=lora, head_trains=full or s.head != "frozen",
                head_copy=not full and s.head == "untied-copy" and shape.tied,
                # the final norm sits above every cut: it trains in every plan except under
                # LoRA, where PEFT freezes it
                norm_trains=not lora)


# ---------------------------------------------------------------------------------------
# The parts of a step's cost (docs/cost-model.md §1-3)

def _attention_flops(shape: ModelShape, s: StepSettings) -> float:
    """A = 4·N·T·d_q: QKᵀ and AV of one layer (flash kernels skip half under "causal")."""
    return 4 * s.tokens * s.seq_len * shape.q_dim * (0.5 if s.attention == "causal" else 1.0)


def _lora_params_per_layer(s: StepSettings) -> int:
    return s.lora_rank * sum(i + o for _, i, o in s.lora_targets)


def _matmul_flops(shape: ModelShape, s: StepSettings, cut: _Cut) -> tuple[float, float]:
    """Forward and backward matmul FLOPs (backward includes checkpointing's recompute)."""
    attn = _attention_flops(shape, s)
    layer_fwd = [2 * P * s.tokens + attn for P in shape.layer_matmul_params]
    head = 2 * shape.hidden_size * shape.vocab_size * s.loss_tokens
    forward = sum(layer_fwd)
    if cut.lora:
        forward += 2 * _lora_params_per_layer(s) * s.tokens * cut.n_train
        layers_backward = _lora_backward_flops(shape, s, cut, attn)
    else:
        # a trained layer: input- and weight-gradients (2x its forward); a frozen one the
        # gradient passes through: input-gradients only (its matmuls once, attention twice)
        layers_backward = sum(2 * layer_fwd[idx] if idx in cut.trainable_layers else layer_fwd[idx] + attn
                              for idx in cut.traversed)
    head_backward = (head if cut.below_head_trains else 0) + (head if cut.head_trains else 0)
    backward = layers_backward + head_backward + _recompute_flops(shape, s, cut, layer_fwd)
    return forward + head, backward


def _lora_backward_flops(shape: ModelShape, s: StepSettings, cut: _Cut, attn: float) -> float:
    """Base weights frozen: input-gradients only (2PN); LoRA A and B: weight- and input-grads."""
    N, per_layer = s.tokens, _lora_params_per_layer(s)
    inproj = sum(i * o for name, i, o in shape.linear_shapes if _is_input_projection(name))
    inproj_lora = s.lora_rank * sum(i for name, i, _ in s.lora_targets if _is_input_projection(name))
    backward = 0.0
    for idx in cut.traversed:
        P = shape.layer_matmul_params[idx]
        bwd = 2 * P * N + 2 * attn + (4 * per_layer * N if idx in cut.trainable_layers else 0)
        if idx == cut.eof:
            # the lowest LoRA layer's input (a frozen norm of frozen h^k) needs no gradient:
            # its input projections skip the input-gradient, base and LoRA-A alike
            bwd -= 2 * N * (inproj + inproj_lora)
        backward += bwd
    return backward


def _recompute_flops(shape: ModelShape, s: StepSettings, cut: _Cut, layer_fwd: list[float]) -> float:
    """Gradient checkpointing: one more forward of every layer the backward goes through."""
    if not s.gradient_checkpointing:
        return 0.0
    # torch's non-reentrant checkpoint stops recomputing once the last saved tensor is back:
    # the layer's final projection (MLP down/out, whose output nobody saves) is skipped
    last = shape.linear_shapes[-1] if shape.linear_shapes else None
    skip = 2 * s.tokens * last[1] * last[2] if last else 0
    recompute = sum(layer_fwd[idx] - skip for idx in cut.traversed)
    if cut.lora:
        last_targeted = last is not None and any(t[0] == last[0] for t in s.lora_targets)
        width = sum(i + o for _, i, o in s.lora_targets) - (last[2] if last_targeted else 0)
        recompute += 2 * s.lora_rank * s.tokens * width * cut.n_train
    return recompute


def _lora_params(s: StepSettings, cut: _Cut) -> int:
    return _lora_params_per_layer(s) * cut.n_train if cut.lora else 0


def _trainable_params(shape: ModelShape, s: StepSettings, cut: _Cut) -> int:
    if cut.full:
        return shape.total_params
    if cut.lora:
        return _lora_params(s, cut) + (shape.unembedding_params if cut.head_trains else 0)
    return (sum(shape.layer_params[idx] for idx in cut.trainable_layers)
            + (shape.final_norm_params if cut.norm_trains else 0)
            + (shape.head_params if cut.head_trains else 0))


def _total_params(shape: ModelShape, s: StepSettings, cut: _Cut) -> int:
    return shape.total_params + (shape.unembedding_params if cut.head_copy else 0) + _lora_params(s, cut)


def _other_flops(shape: ModelShape, s: StepSettings, cut: _Cut, trainable: int) -> tuple[int, int]:
    """Non-matmul FLOPs: (the optimizer's, all of them: optimizer, embedding gradient, loss)."""
    optimizer = OPTIMIZER_FLOPS_PER_PARAM[s.optimizer] * trainable
    embedding = s.tokens * shape.hidden_size if cut.full else 0     # scatter-add of the token gradients
    loss = CE_FLOPS_PER_LOGIT * shape.vocab_size * s.loss_tokens
    return optimizer, optimizer + embedding + loss


def _elementwise_bytes(shape: ModelShape, s: StepSettings, cut: _Cut) -> int:
    """Bytes the layers' elementwise work streams: forward of every layer (+ LoRA branches),
    backward of the layers the gradient goes through (2x), recompute (1x)."""
    N, b, L = s.tokens, s.dtype_bytes, shape.num_layers
    ff_words = EW_PER_FF_GATED if shape.gated_mlp else EW_PER_FF_PLAIN
    layer = N * (EW_PER_D * shape.hidden_size + EW_PER_KV * shape.kv_dim
                 + ff_words * shape.intermediate_size) * b
    lora = N * sum(i + 4 * o for _, i, o in s.lora_targets) * b if cut.lora else 0
    n_back, n_train = cut.n_back, cut.n_train
    streamed = (L * layer + n_train * lora + 2 * (n_back * layer + n_train * lora)
                + (n_back * layer + n_train * lora if s.gradient_checkpointing else 0))
    if s.attention == "eager":        # softmax over H·T·T scores: r/w forward, r/r/w backward
        probs = N * s.seq_len * shape.num_heads * 4
        streamed += L * 2 * probs + n_back * 3 * probs
    return streamed


def _bytes_moved(shape: ModelShape, s: StepSettings, cut: _Cut, trainable: int) -> int:
    """Bytes streamed through DRAM/HBM: layers, loss, optimizer update, embedding gradient."""
    b = s.dtype_bytes
    loss = shape.vocab_size * s.loss_tokens * (CE_BYTES_PER_LOGIT_FP32
                                               + (CE_BYTES_PER_LOGIT_EXTRA_LOWP if b < 4 else 0))
    optimizer = OPTIMIZER_WORDS[s.optimizer_impl][s.optimizer] * trainable * b
    embedding = 0
    if cut.full:     # dense V x d gradient: zero-fill; tied: summing the head's and the embedding's
        embedding = shape.embedding_params * b + (3 * shape.unembedding_params * b if shape.tied else 0)
    return _elementwise_bytes(shape, s, cut) + loss + optimizer + embedding


def _page_faulted_bytes(shape: ModelShape, s: StepSettings, cut: _Cut) -> int:
    """Bytes of large tensors allocated afresh every step: on a CPU each pays its page faults."""
    if not s.machine.page_fault_bytes_per_s:
        return 0
    b = s.dtype_bytes
    temps = OPTIMIZER_TEMPORARIES.get(s.optimizer_impl, {}).get(s.optimizer, 0)

    def big(nbytes):
        return nbytes if nbytes >= s.machine.large_alloc_bytes else 0

    vd = shape.unembedding_params * b
    fresh = 0
    if cut.full and shape.tied:
        fresh += big(vd) * (3 + temps)       # embedding grad (zeros), head grad, their sum, temps
    elif cut.full:                           # untied: each matrix its own gradient + temps
        fresh += (big(shape.embedding_params * b) + big(vd)) * (1 + temps)
    elif cut.head_trains:
        fresh += big(vd) * (1 + temps)       # head grad + optimizer temporaries
    if not cut.lora:
        for _, i, o in shape.linear_shapes:
            fresh += cut.n_train * big(i * o * b) * (1 + temps)
    ff_bytes = s.tokens * shape.intermediate_size * b
    fresh += cut.n_back * (4 if shape.gated_mlp else 2) * big(ff_bytes)
    fresh += 4 * big(s.loss_tokens * shape.vocab_size * 4) if cut.below_head_trains or cut.head_trains else 0
    return fresh


def _activation_bytes(shape: ModelShape, s: StepSettings, cut: _Cut) -> float:
    """Activations saved for backward. Every layer the backward goes through keeps them (a
    frozen one too: its norms, activation functions and attention need them for the
    input-gradient)."""
    N, b = s.tokens, s.dtype_bytes
    per_token = activation_bytes_per_token(shape, s.seq_len, b, "eager" if s.attention == "eager" else "sdpa")
    if cut.lora:
        per_token += s.lora_rank * len(s.lora_targets) * b
    if s.gradient_checkpointing:
        return cut.n_back * N * shape.hidden_size * b + (N * per_token if cut.n_back else 0)
    return cut.n_back * N * per_token


def _peak_memory(shape: ModelShape, s: StepSettings, cut: _Cut, trainable: int,
                 total: int) -> tuple[float, dict, str]:
    """(peak bytes, its breakdown, the phase it happens in).

    Peak: at the start of backward (all saved activations, the logits workspace, no parameter
    gradients yet: zero_grad(set_to_none=True)) or after it (all gradients, no activations);
    in between, each layer's activations are freed as its (smaller) gradients appear.
    """
    b = s.dtype_bytes
    activations = _activation_bytes(shape, s, cut)
    workspace = s.tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) * b   # one layer's
    logits = s.loss_tokens * shape.vocab_size * (b + 4 * LOGITS_WORKSPACE_FP32_COPIES)
    breakdown = {
        "weights": total * b,
        "grads": trainable * b,
        "optimizer": OPTIMIZER_STATES[s.optimizer] * trainable * b,
        "activations": activations,
        "logits": logits,
        "workspace": workspace,
    }
    static = breakdown["weights"] + breakdown["optimizer"] + workspace
    head_grad = (shape.unembedding_params * b) if cut.head_trains else 0
    at_backward_start = static + activations + logits + head_grad
    after_backward = static + breakdown["grads"]
    phase = "backward-start" if at_backward_start >= after_backward else "after-backward"
    return max(at_backward_start, after_backward), breakdown, phase


def _step_time(machine: Machine, matmul: float, streamed: float, page_faulted: float) -> float:
    return (matmul / machine.matmul_flops_per_s + streamed / machine.bytes_per_s
            + (page_faulted / machine.page_fault_bytes_per_s if machine.page_fault_bytes_per_s else 0.0))


def _cost(shape: ModelShape, s: StepSettings, k: int | None, layers=None) -> dict:
    """Absolute costs of one step (`_cut` says what k and layers mean)."""
    cut = _cut(shape, s, k, layers)
    matmul_fwd, matmul_bwd = _matmul_flops(shape, s, cut)
    matmul = matmul_fwd + matmul_bwd
    trainable = _trainable_params(shape, s, cut)
    total = _total_params(shape, s, cut)
    optimizer_flops, other_flops = _other_flops(shape, s, cut, trainable)
    streamed = _bytes_moved(shape, s, cut, trainable)
    page_faulted = _page_faulted_bytes(shape, s, cut)
    memory, breakdown, peak_phase = _peak_memory(shape, s, cut, trainable, total)
    return {
        "cut": "full" if cut.full else cut.eof,
        "eof": cut.eof,
        "full": cut.full,
        "valid": cut.full or cut.n_train > 0 or cut.head_trains,
        "trainable_layers": shape.num_layers if cut.full else cut.n_train,
        "trainable_params": int(trainable),
        "frozen_params": int(total - trainable),
        "total_params": int(total),
        "flops_abs": float(matmul + other_flops),
        "matmul_flops": float(matmul),
        "matmul_flops_forward": float(matmul_fwd),
        "matmul_flops_backward": float(matmul_bwd),
        "optimizer_flops": float(optimizer_flops),
        "other_flops": float(other_flops),
        "bytes_moved": float(streamed),
        "bytes_page_faulted": float(page_faulted),
        "memory_bytes": float(memory),
        "memory_breakdown": {name: float(v) for name, v in breakdown.items()},
        "memory_peak_phase": peak_phase,
        "step_time_s": float(_step_time(s.machine, matmul, streamed, page_faulted)),
    }


# ---------------------------------------------------------------------------------------
# Public API

def cost_curve(shape: ModelShape, step: StepSettings | int | None = None, batch_size: int | None = None, *,
               include_full: bool = False, **settings) -> list[dict]:
    """Predicted per-step cost of every cut k = 0..L (list index = k), relative to full FT.

    `step`: the step's `StepSettings`. The loose form of older code,
    cost_curve(shape, seq_len, batch_size, **settings) with `StepSettings`' fields as
    keywords, gives the same numbers (`StepSettings.of`).

    Each entry: absolute numbers (`flops_abs`, `matmul_flops`, `memory_bytes`,
    `step_time_s`, `trainable_params`, ...) and ratios to full fine-tuning of the
    same batch: `flops` = `flops_ratio`, `matmul_flops_ratio`, `memory` =
    `memory_ratio`, `step_time_ratio`. `valid` is False where nothing would train
    (k = L with a frozen head). With `include_full=True` the full fine-tuning
    entry (`"full": True`, `"cut": "full"`) is appended as entry L+1.

    The settings' loss_positions: "all" (LM/SFT loss on every position), "last" (classification
    with logits_to_keep=1) or a count of loss positions per sequence.
    attention: "sdpa" (FLOPs of the full T x T scores, as CPU kernels compute),
    "causal" (half of them: flash kernels skip masked blocks), "eager" (full, plus
    the probabilities saved and streamed).
    """
    s = StepSettings.of(step, batch_size, **settings).check(shape)
    full = _cost(shape, s, None)
    entries = [_cost(shape, s, k) for k in range(shape.num_layers + 1)]
    if include_full:
        entries.append(full)
    for e in entries:
        _add_ratios(e, full, s)
    return entries


def _add_ratios(e: dict, full: dict, s: StepSettings) -> None:
    e["flops_ratio"] = e["flops"] = e["flops_abs"] / full["flops_abs"]
    e["matmul_flops_ratio"] = e["matmul_flops"] / full["matmul_flops"]
    e["memory_ratio"] = e["memory"] = e["memory_bytes"] / full["memory_bytes"]
    e["step_time_ratio"] = predicted_step_time_ratio(e, full)
    e["machine"] = s.machine.name
    e["lora_rank"] = s.lora_rank
    e["head"] = "trainable" if e["full"] else s.head


def layer_set_cost(shape: ModelShape, layers, step: StepSettings | int | None = None,
                   batch_size: int | None = None, **settings) -> dict:
    """Predicted per-step cost of training only `layers` (0-based, any set), relative to
    full fine-tuning, as one cost_curve entry. The frozen layers above the lowest trained
    one are not free: the gradient passes through them (input-gradients, activations).
    `step`: a `StepSettings`, or cost_curve's loose form (seq_len, batch_size, **settings)."""
    layers = sorted({int(i) for i in layers})
    if not layers or not all(0 <= i < shape.num_layers for i in layers):
        raise SalfError(f"cost model: layers must be a non-empty set of indices in "
                        f"[0, {shape.num_layers - 1}], got {layers}")
    s = StepSettings.of(step, batch_size, **settings).check(shape)
    entry = _cost(shape, s, layers[0], layers=layers)
    _add_ratios(entry, _cost(shape, s, None), s)
    entry["layers"] = layers
    return entry


def forward_flops(shape: ModelShape, seq_len: int, rows: int, *, from_layer: int = 0,
                  head_positions: int = 1, attention: str = "sdpa") -> float:
    """Matmul FLOPs of one forward pass (no backward) over rows x seq_len tokens through
    decoder layers from_layer..L-1 — those below are replayed from a cache — and the head
    at `head_positions` per row: what a dynamic-freezing probe read costs."""
    if not 0 <= from_layer <= shape.num_layers:
        raise SalfError(f"cost model: from_layer must be in [0, {shape.num_layers}], got {from_layer}")
    s = StepSettings(seq_len, rows, loss_positions=head_positions, attention=attention).check(shape)
    attn = _attention_flops(shape, s)
    layers = sum(2 * P * s.tokens + attn for P in shape.layer_matmul_params[from_layer:])
    return float(layers + 2 * shape.hidden_size * shape.vocab_size * s.loss_tokens)


def full_cost(shape: ModelShape, seq_len: int, batch_size: int, **kwargs) -> dict:
    """The full fine-tuning entry (everything trainable) under the same settings."""
    kwargs.pop("include_full", None)
    return cost_curve(shape, StepSettings(seq_len, batch_size, **kwargs), include_full=True)[-1]


def predicted_step_time_ratio(entry: dict, full: dict) -> float:
    """Predicted step time of `entry` relative to full fine-tuning `full`.

    Both come from `cost_curve` with the same machine: step time = matmul FLOPs /
    matmul throughput + streamed bytes / bandwidth + page-faulted bytes / page-fault rate.
    With a compute-only machine this reduces to the matmul FLOPs ratio; the memory
    terms are what make frozen embeddings (no V x d gradient, no optimizer update
    over V·d) save more than the FLOPs ratio suggests.
    """
    if full["step_time_s"] <= 0:
        return math.nan
    return entry["step_time_s"] / full["step_time_s"]


def cost_table(shape: ModelShape, seq_len: int, batch_size: int, **kwargs) -> dict:
    """`{"settings", "shape", "full", "cuts"}`: a JSON-ready cost table for trace.json / reports."""
    kwargs.pop("include_full", None)
    entries = cost_curve(shape, StepSettings(seq_len, batch_size, **kwargs), include_full=True)
    settings = dict(seq_len=seq_len, batch_size=batch_size, **kwargs)
    settings["machine"] = get_machine(kwargs.get("machine", "auto")).to_dict()
    return {"settings": settings, "shape": shape.to_dict(), "full": entries[-1], "cuts": entries[:-1]}


def plan_prediction(entry: dict) -> dict:
    """The cost part of `FreezePlan.predicted` from one `cost_curve` entry."""
    keys = ("flops_ratio", "matmul_flops_ratio", "memory_ratio", "step_time_ratio", "trainable_params",
            "flops_abs", "memory_bytes", "step_time_s", "machine")
    return {k: entry[k] for k in keys if k in entry}
