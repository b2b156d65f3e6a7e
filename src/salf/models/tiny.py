"""Tiny random causal LMs of real families, built in-process (no files).

Used by the unit tests and by anyone who wants to try the whole pipeline in
seconds: `salf analyze --model tiny-llama ...`. Weights are random (seeded),
so results are meaningless except as a check that the machinery runs.
"""

from __future__ import annotations

from functools import lru_cache

import torch

TINY_VOCAB = 512

# Text the tiny tokenizer is trained on: enough English for sensible merges, and
# every built-in verbalizer word repeated so each becomes a single token.
_LABEL_WORDS = ["positive", "negative", "business", "entertainment", "politics", "sport",
                "tech", "yes", "no", "good", "bad", "fresh", "rotten"]
_CORPUS = (
    "The movie was a delight from start to finish, with a warm story and good acting. "
    "This film is a mess: slow, dull and far too long. Review: Sentiment: Topic: Answer: "
    "Question: Article: The government announced new policies on the economy and trade. "
    "The team won the match after a late goal. A new phone with a faster chip was released. "
    "What is your name? I am a chatbot. How are you? I am fine, thank you. "
)

# family name -> (config class name, kwargs). Shapes are small but keep the
# family's features: GQA (llama, qwen), soft-capping (gemma2), tied heads.
_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, max_position_embeddings=128)

TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_COMMON, num_key_value_heads=2, head_dim=8,
                                  tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(_COMMON, num_key_value_heads=1, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(_COMMON, num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                    sliding_window=16)),
    "gemma3": ("Gemma3TextConfig", dict(_COMMON, num_key_value_heads=2, head_dim=8,
                                        sliding_window=16, final_logit_softcapping=30.0)),
    "phi3": ("Phi3Config", dict(_COMMON, num_key_value_heads=4, tie_word_embeddings=False)),
    "phi": ("PhiConfig", dict(_COMMON, num_key_value_heads=4, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(vocab_size=TINY_VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128)),
    "gpt-neox": ("GPTNeoXConfig", dict(_COMMON, tie_word_embeddings=False)),
    "opt": ("OPTConfig", dict(vocab_size=TINY_VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                              num_attention_heads=4, max_position_embeddings=128,
                              word_embed_proj_dim=32)),
    "falcon": ("FalconConfig", dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=4,
                                    num_attention_heads=4, new_decoder_architecture=False,
                                    multi_query=True, parallel_attn=True, bias=False,
                                    tie_word_embeddings=True)),
}


def tiny_model(family: str, seed: int = 0, num_layers: int | None = None):
    """A randomly initialised causal LM of `family` (see TINY_FAMILIES), in eval mode, fp32."""
    import transformers

    if family not in TINY_FAMILIES:
        from ..errors import SalfError

        raise SalfError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    cls_name, kwargs = TINY_FAMILIES[family]
    kwargs = dict(kwargs)
    if num_layers is not None:
        kwargs["n_layer" if family == "gpt2" else "num_hidden_layers"] = num_layers
    kwargs.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.name_or_path = f"tiny-{family}"
    return model.eval()


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab TINY_VOCAB) trained in-process, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    words = " ".join(f"{w} {w.capitalize()}" for w in _LABEL_WORDS)
    tok.train_from_iterator([_CORPUS] * 20 + [words] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")
