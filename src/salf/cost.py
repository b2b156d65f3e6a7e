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
"""

from __future__ import annotations

import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import SalfError

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
# The cost of one configuration

_HEADS = ("frozen", "trainable", "untied-copy")


def _check_settings(shape: ModelShape, seq_len, batch_size, loss_positions, optimizer, dtype_bytes,
                    head, lora_rank, attention):
    if not (isinstance(seq_len, int) and seq_len > 0 and isinstance(batch_size, int) and batch_size > 0):
        raise SalfError(f"cost model: seq_len and batch_size must be positive integers, got "
                        f"{seq_len!r} and {batch_size!r}")
    if loss_positions not in ("all", "last") and not (isinstance(loss_positions, int) and loss_positions > 0):
        raise SalfError(f"cost model: loss_positions must be 'all', 'last' or a positive count, "
                        f"got {loss_positions!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise SalfError(f"cost model: unknown optimizer {optimizer!r}; choose from "
                        f"{', '.join(OPTIMIZER_STATES)}")
    if dtype_bytes not in (1, 2, 4, 8):
        raise SalfError(f"cost model: dtype_bytes must be 1, 2, 4 or 8, got {dtype_bytes!r}")
    if head not in _HEADS:
        raise SalfError(f"cost model: head must be one of {', '.join(_HEADS)}, got {head!r}")
    if head == "trainable" and shape.tied:
        raise SalfError("cost model: head='trainable' is impossible with tied embeddings (it would need "
                        "backward down to the input); use head='untied-copy' or 'frozen'")
    if lora_rank is not None and not (isinstance(lora_rank, int) and lora_rank > 0):
        raise SalfError(f"cost model: lora_rank must be a positive integer, got {lora_rank!r}")
    if attention not in ("sdpa", "eager", "causal"):
        raise SalfError(f"cost model: attention must be 'sdpa', 'eager' or 'causal', got {attention!r}")


def _is_input_projection(name: str) -> bool:
    last = name.split(".")[-1].lower()
    return any(h == last or last.startswith(h) for h in _INPUT_PROJ_HINTS)


def _lora_targets(shape: ModelShape, targets) -> list[list]:
    if targets in (None, "all-linear"):
        return list(shape.linear_shapes)
    wanted = set(targets)
    chosen = [s for s in shape.linear_shapes if s[0].split(".")[-1] in wanted or s[0] in wanted]
    if not chosen:
        raise SalfError(f"cost model: no LoRA target among {sorted(wanted)} in this model's layers "
                        f"({', '.join(s[0] for s in shape.linear_shapes)})")
    return chosen


def _cost(shape: ModelShape, k: int | None, *, T: int, B: int, loss_positions, optimizer: str, b: int,
          head: str, lora_rank: int | None, lora_targets, checkpointing: bool, attention: str,
          machine: Machine, layers=None) -> dict:
    """Absolute costs of one step. k=None is full fine-tuning (everything trainable).

    layers: a set of trainable layers with min(layers) = k (Spectrum's kind of plan): the
    others above k stay frozen, but the gradient still passes through them to layer k, so
    they cost an input-gradient backward (no weight gradient, no optimizer state).
    """
    full = k is None
    L, d, V = shape.num_layers, shape.hidden_size, shape.vocab_size
    kk = 0 if full else k
    traversed = range(kk, L)                 # layers the backward pass goes through
    trainable_layers = traversed if full or layers is None else sorted(layers)
    n_train = len(trainable_layers)
    n_back = L - kk
    lora = lora_rank is not None and not full
    N = B * T
    Nh = N if loss_positions == "all" else B * (1 if loss_positions == "last" else min(loss_positions, T))
    head_w_trains = full or head in ("trainable", "untied-copy")
    head_copy = (not full) and head == "untied-copy" and shape.tied
    # the final norm sits above every cut: it trains in every plan (not under LoRA, where PEFT
    # freezes it), so the head's input-gradient is needed whenever the norm or a layer trains
    norm_trains = not lora
    anything_below_head_trains = n_train > 0 or norm_trains

    # --- matmul FLOPs ------------------------------------------------------------------
    attn_fwd = 4 * N * T * shape.q_dim * (0.5 if attention == "causal" else 1.0)
    layer_fwd = [2 * P * N + attn_fwd for P in shape.layer_matmul_params]
    fwd_layers = sum(layer_fwd)
    bwd_layers = 0.0
    lora_params = 0
    targets = _lora_targets(shape, lora_targets) if lora else []
    inproj = sum(i * o for name, i, o in shape.linear_shapes if _is_input_projection(name))
    if lora:
        r = lora_rank
        per_layer_lora = r * sum(i + o for _, i, o in targets)
        lora_params = per_layer_lora * n_train
        fwd_layers += 2 * per_layer_lora * N * n_train
        for idx in traversed:
            P = shape.layer_matmul_params[idx]
            # base weights frozen: input-gradient only (2PN); LoRA A and B: weight- and input-grads
            bwd = 2 * P * N + 2 * attn_fwd + (4 * per_layer_lora * N if idx in trainable_layers else 0)
            if idx == kk:
                # the lowest LoRA layer's input (a frozen norm of frozen h^k) needs no gradient:
                # its input projections skip the input-gradient, base and LoRA-A alike
                bwd -= 2 * N * (inproj + r * sum(i for n, i, _ in targets if _is_input_projection(n)))
            bwd_layers += bwd
    else:
        # a trained layer: input- and weight-gradients (2x its forward); a frozen one the
        # gradient passes through: input-gradients only (its matmuls once, attention twice)
        bwd_layers = sum(2 * layer_fwd[idx] if idx in trainable_layers else layer_fwd[idx] + attn_fwd
                         for idx in traversed)
    recompute = 0.0
    if checkpointing:
        # torch's non-reentrant checkpoint stops recomputing once the last saved tensor is back:
        # the layer's final projection (MLP down/out, whose output nobody saves) is skipped
        last = shape.linear_shapes[-1] if shape.linear_shapes else None
        skip = 2 * N * last[1] * last[2] if last else 0
        recompute = sum(layer_fwd[idx] - skip for idx in traversed)
        if lora:
            last_targeted = last is not None and any(t[0] == last[0] for t in targets)
            per = 2 * lora_rank * N * (sum(i + o for _, i, o in targets) - (last[2] if last_targeted else 0))
            recompute += per * n_train
    head_unit = 2 * d * V * Nh
    head_fwd = head_unit
    head_bwd = (head_unit if anything_below_head_trains else 0) + (head_unit if head_w_trains else 0)
    matmul_fwd = fwd_layers + head_fwd
    matmul_bwd = bwd_layers + head_bwd + recompute
    matmul = matmul_fwd + matmul_bwd

    # --- trainable parameters ----------------------------------------------------------
    if full:
        trainable = shape.total_params
    elif lora:
        trainable = lora_params + (shape.unembedding_params if head_w_trains else 0)
    else:
        trainable = (sum(shape.layer_params[idx] for idx in trainable_layers)
                     + (shape.final_norm_params if norm_trains else 0)
                     + (shape.head_params if head_w_trains else 0))
    total = shape.total_params + (shape.unembedding_params if head_copy else 0) + lora_params
    emb_trains = full

    # --- non-matmul FLOPs --------------------------------------------------------------
    opt_flops = OPTIMIZER_FLOPS_PER_PARAM[optimizer] * trainable
    emb_flops = N * d if emb_trains else 0                  # scatter-add of the token gradients
    ce_flops = CE_FLOPS_PER_LOGIT * V * Nh
    other_flops = opt_flops + emb_flops + ce_flops

    # --- memory traffic (bytes streamed) -----------------------------------------------
    ff_ew = EW_PER_FF_GATED if shape.gated_mlp else EW_PER_FF_PLAIN
    ew_layer = N * (EW_PER_D * d + EW_PER_KV * shape.kv_dim + ff_ew * shape.intermediate_size) * b
    lora_ew = N * sum(i + 4 * o for _, i, o in targets) * b if lora else 0
    # forward of every layer (+ LoRA branches), backward of trainable ones (2x), recompute (1x)
    ew_bytes = (L * ew_layer + n_train * lora_ew + 2 * (n_back * ew_layer + n_train * lora_ew)
                + (n_back * ew_layer + n_train * lora_ew if checkpointing else 0))
    if attention == "eager":        # softmax over H·T·T scores: r/w forward, r/r/w backward
        probs = N * T * shape.num_heads * 4
        ew_bytes += L * 2 * probs + n_back * 3 * probs
    ce_bytes = V * Nh * (CE_BYTES_PER_LOGIT_FP32 + (CE_BYTES_PER_LOGIT_EXTRA_LOWP if b < 4 else 0))
    impl = machine.optimizer_impl if machine.optimizer_impl in OPTIMIZER_WORDS else "fused"
    opt_bytes = OPTIMIZER_WORDS[impl][optimizer] * trainable * b
    emb_bytes = 0
    if emb_trains:   # dense V x d gradient: zero-fill; tied: summing the head's and the embedding's
        emb_bytes = shape.embedding_params * b + (3 * shape.unembedding_params * b if shape.tied else 0)
    traffic = ew_bytes + ce_bytes + opt_bytes + emb_bytes

    # --- freshly allocated large tensors (CPU page faults) ------------------------------
    fresh = 0
    thr = machine.large_alloc_bytes
    temps = OPTIMIZER_TEMPORARIES.get(impl, {}).get(optimizer, 0)
    if machine.page_fault_bytes_per_s:
        def big(nbytes):
            return nbytes if nbytes >= thr else 0
        vd = shape.unembedding_params * b
        if emb_trains and shape.tied:
            fresh += big(vd) * (3 + temps)       # embedding grad (zeros), head grad, their sum, temps
        elif emb_trains:                         # untied: each matrix its own gradient + temps
            fresh += (big(shape.embedding_params * b) + big(vd)) * (1 + temps)
        elif head_w_trains:
            fresh += big(vd) * (1 + temps)       # head grad + optimizer temporaries
        if not lora:
            for _, i, o in shape.linear_shapes:
                fresh += n_train * big(i * o * b) * (1 + temps)
        ff_bytes = N * shape.intermediate_size * b
        fresh += n_back * (4 if shape.gated_mlp else 2) * big(ff_bytes)
        fresh += 4 * big(Nh * V * 4) if anything_below_head_trains or head_w_trains else 0

    # --- peak memory -------------------------------------------------------------------
    n_states = OPTIMIZER_STATES[optimizer]
    act_tok = activation_bytes_per_token(shape, T, b, "eager" if attention == "eager" else "sdpa")
    if lora:
        act_tok += lora_rank * len(targets) * b
    # every layer the backward goes through keeps its activations (a frozen one too: its
    # norms, activation functions and attention need them for the input-gradient)
    if checkpointing:
        activations = n_back * N * d * b + (N * act_tok if n_back else 0)
    else:
        activations = n_back * N * act_tok
    workspace = N * (4 * d + 3 * shape.intermediate_size) * b    # one layer's live intermediates
    logits = Nh * V * (b + 4 * LOGITS_WORKSPACE_FP32_COPIES)
    mem = {
        "weights": total * b,
        "grads": trainable * b,
        "optimizer": n_states * trainable * b,
        "activations": activations,
        "logits": logits,
        "workspace": workspace,
    }
    # Peak: at the start of backward (all saved activations, the logits workspace, no parameter
    # gradients yet: zero_grad(set_to_none=True)) or after it (all gradients, no activations);
    # in between, each layer's activations are freed as its (smaller) gradients appear.
    static = mem["weights"] + mem["optimizer"] + workspace
    head_grad = (shape.unembedding_params * b) if head_w_trains else 0
    at_backward_start = static + activations + logits + head_grad
    after_backward = static + mem["grads"]
    memory = max(at_backward_start, after_backward)
    peak_phase = "backward-start" if at_backward_start >= after_backward else "after-backward"

    flops = matmul + other_flops
    t = (matmul / machine.matmul_flops_per_s + traffic / machine.bytes_per_s
         + (fresh / machine.page_fault_bytes_per_s if machine.page_fault_bytes_per_s else 0.0))
    valid = full or n_train > 0 or head_w_trains
    return {
        "cut": "full" if full else kk,
        "eof": kk,
        "full": full,
        "valid": valid,
        "trainable_layers": L if full else n_train,
        "trainable_params": int(trainable),
        "frozen_params": int(total - trainable),
        "total_params": int(total),
        "flops_abs": float(flops),
        "matmul_flops": float(matmul),
        "matmul_flops_forward": float(matmul_fwd),
        "matmul_flops_backward": float(matmul_bwd),
        "optimizer_flops": float(opt_flops),
        "other_flops": float(other_flops),
        "bytes_moved": float(traffic),
        "bytes_page_faulted": float(fresh),
        "memory_bytes": float(memory),
        "memory_breakdown": {k_: float(v) for k_, v in mem.items()},
        "memory_peak_phase": peak_phase,
        "step_time_s": float(t),
    }


def _step_settings(shape, seq_len, batch_size, loss_positions, optimizer, dtype_bytes, head,
                   lora_rank, gradient_checkpointing, lora_targets, attention, machine):
    """Checked settings of one training step: (machine, keyword arguments of _cost)."""
    _check_settings(shape, seq_len, batch_size, loss_positions, optimizer, dtype_bytes, head, lora_rank,
                    attention)
    m = get_machine(machine)
    return m, dict(T=seq_len, B=batch_size, loss_positions=loss_positions, optimizer=optimizer,
                   b=dtype_bytes, head=head, lora_rank=lora_rank, lora_targets=lora_targets,
                   checkpointing=gradient_checkpointing, attention=attention, machine=m)


def cost_curve(shape: ModelShape, seq_len: int, batch_size: int, loss_positions="all",
               optimizer: str = "adamw", dtype_bytes: int = 4, head: str = "frozen",
               lora_rank: int | None = None, gradient_checkpointing: bool = False, *,
               lora_targets=None, attention: str = "sdpa", machine="auto",
               include_full: bool = False) -> list[dict]:
    """Predicted per-step cost of every cut k = 0..L (list index = k), relative to full FT.

    Each entry: absolute numbers (`flops_abs`, `matmul_flops`, `memory_bytes`,
    `step_time_s`, `trainable_params`, ...) and ratios to full fine-tuning of the
    same batch: `flops` = `flops_ratio`, `matmul_flops_ratio`, `memory` =
    `memory_ratio`, `step_time_ratio`. `valid` is False where nothing would train
    (k = L with a frozen head). With `include_full=True` the full fine-tuning
    entry (`"full": True`, `"cut": "full"`) is appended as entry L+1.

    loss_positions: "all" (LM/SFT loss on every position), "last" (classification
    with logits_to_keep=1) or a count of loss positions per sequence.
    attention: "sdpa" (FLOPs of the full T x T scores, as CPU kernels compute),
    "causal" (half of them: flash kernels skip masked blocks), "eager" (full, plus
    the probabilities saved and streamed).
    """
    m, kw = _step_settings(shape, seq_len, batch_size, loss_positions, optimizer, dtype_bytes, head,
                           lora_rank, gradient_checkpointing, lora_targets, attention, machine)
    full = _cost(shape, None, **kw)
    entries = [_cost(shape, k, **kw) for k in range(shape.num_layers + 1)]
    if include_full:
        entries.append(full)
    for e in entries:
        _add_ratios(e, full, m.name, lora_rank, head)
    return entries


def _add_ratios(e: dict, full: dict, machine: str, lora_rank, head: str) -> None:
    e["flops_ratio"] = e["flops"] = e["flops_abs"] / full["flops_abs"]
    e["matmul_flops_ratio"] = e["matmul_flops"] / full["matmul_flops"]
    e["memory_ratio"] = e["memory"] = e["memory_bytes"] / full["memory_bytes"]
    e["step_time_ratio"] = predicted_step_time_ratio(e, full)
    e["machine"] = machine
    e["lora_rank"] = lora_rank
    e["head"] = "trainable" if e["full"] else head


def layer_set_cost(shape: ModelShape, layers, seq_len: int, batch_size: int,
                   loss_positions="all", optimizer: str = "adamw", dtype_bytes: int = 4,
                   head: str = "frozen", lora_rank: int | None = None,
                   gradient_checkpointing: bool = False, *, lora_targets=None,
                   attention: str = "sdpa", machine="auto") -> dict:
    """Predicted per-step cost of training only `layers` (0-based, any set), relative to
    full fine-tuning, as one cost_curve entry. The frozen layers above the lowest trained
    one are not free: the gradient passes through them (input-gradients, activations)."""
    layers = sorted({int(i) for i in layers})
    if not layers or not all(0 <= i < shape.num_layers for i in layers):
        raise SalfError(f"cost model: layers must be a non-empty set of indices in "
                        f"[0, {shape.num_layers - 1}], got {layers}")
    m, kw = _step_settings(shape, seq_len, batch_size, loss_positions, optimizer, dtype_bytes, head,
                           lora_rank, gradient_checkpointing, lora_targets, attention, machine)
    entry = _cost(shape, layers[0], layers=layers, **kw)
    _add_ratios(entry, _cost(shape, None, **kw), m.name, lora_rank, head)
    entry["layers"] = layers
    return entry


def full_cost(shape: ModelShape, seq_len: int, batch_size: int, **kwargs) -> dict:
    """The full fine-tuning entry (everything trainable) under the same settings."""
    kwargs.pop("include_full", None)
    return cost_curve(shape, seq_len, batch_size, include_full=True, **kwargs)[-1]


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
    entries = cost_curve(shape, seq_len, batch_size, include_full=True, **kwargs)
    settings = dict(seq_len=seq_len, batch_size=batch_size, **kwargs)
    settings["machine"] = get_machine(kwargs.get("machine", "auto")).to_dict()
    return {"settings": settings, "shape": shape.to_dict(), "full": entries[-1], "cuts": entries[:-1]}


def plan_prediction(entry: dict) -> dict:
    """The cost part of `FreezePlan.predicted` from one `cost_curve` entry."""
    keys = ("flops_ratio", "matmul_flops_ratio", "memory_ratio", "step_time_ratio", "trainable_params",
            "flops_abs", "memory_bytes", "step_time_s", "machine")
    return {k: entry[k] for k in keys if k in entry}
