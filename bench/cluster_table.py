"""Per-rank memory and gradient communication of freezing at cluster scale: model output.

Prints the Markdown tables of docs/multi-gpu.md: Llama-3-8B and Llama-3-70B shapes (from
their configs, no weights) on 8 and 64 GPUs, cuts 0, L/2, 3L/4 and full fine-tuning, for
DDP, ZeRO-2 and FSDP (ZeRO-3 is costed as FSDP). Nothing here is measured; the formulas
are salf.cluster's, and tests/test_cluster.py checks the gradient bytes against torch.

    python bench/cluster_table.py > /tmp/cluster.md
"""
from __future__ import annotations

import argparse

import transformers

from salf.cluster import cluster_curve, markdown_header, markdown_rows, table_cuts
from salf.cost import ModelShape

#: The real shapes (config.json of meta-llama/Meta-Llama-3-8B and -70B).
SHAPES = {
    "Llama-3-8B": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8),
    "Llama-3-70B": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                        num_attention_heads=64, num_key_value_heads=8),
}
RANKS = (8, 64)
ENGINES = ("ddp", "zero2", "fsdp")


def llama3_shape(name: str) -> ModelShape:
    return ModelShape.from_config(transformers.LlamaConfig(vocab_size=128256, tie_word_embeddings=False,
                                                           **SHAPES[name]))


def engine_table(shape: ModelShape, engine: str, settings: dict) -> list[str]:
    """One engine's table: a row per (ranks, cut)."""
    lines = markdown_header("GPUs")
    for ranks in RANKS:
        curve = cluster_curve(shape, ranks=ranks, engine=engine, **settings)
        lines += markdown_rows(curve, table_cuts(shape.num_layers), lead=str(ranks))
    return lines


def tables(settings: dict) -> str:
    out = []
    for name in SHAPES:
        shape = llama3_shape(name)
        out.append(f"#### {name} ({shape.total_params / 1e9:.2f}B parameters, {shape.num_layers} layers)")
        for engine in ENGINES:
            out += ["", f"{engine}:", "", *engine_table(shape, engine, settings)]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="sequences per rank per micro-batch (default %(default)s)")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="cost without gradient checkpointing of the trainable layers")
    p.add_argument("--precision", choices=("bf16-mixed", "uniform"), default="bf16-mixed",
                   help="bf16 weights/grads + fp32 master and Adam states, or everything in bf16 "
                        "(default %(default)s)")
    args = p.parse_args(argv)
    settings = dict(seq_len=args.seq_len, batch_size=args.batch_size, loss_positions="all",
                    dtype_bytes=2, gradient_checkpointing=not args.no_checkpointing, machine="h100",
                    precision=args.precision)
    print(f"Model output, not measured: per GPU, {args.precision}, AdamW, micro-batch "
          f"{args.batch_size} x {args.seq_len} tokens per GPU, LM loss on every position, gradient "
          f"checkpointing of the trainable layers {'off' if args.no_checkpointing else 'on'}.\n")
    print(tables(settings))


if __name__ == "__main__":
    main()
