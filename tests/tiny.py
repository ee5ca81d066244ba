"""Tiny random Hugging Face checkpoints for tests, written with transformers' own `save_pretrained`.

`make_checkpoint(family, directory)` writes config.json, model.safetensors and a small real
`tokenizer.json` (a byte-level BPE trained here on a few code strings), so tests exercise our loader on
files laid out exactly as the hub's. Each family turns on what makes it special (llama3 RoPE scaling,
Qwen2 biases, Gemma norms, Gemma 2 soft-capping and sliding windows shorter than the test sequences,
Gemma 3 q/k norms and local RoPE, Phi-3 fused projections and an untied head).
"""
import json
import os

import torch

FAMILIES = ("llama", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3")
VOCAB = 320

_TRAIN_TEXT = [
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:", "class Foo:\n    pass\n", "x = [1, 2, 3]\ny = {'a': 1}\n",
    "SELECT * FROM users WHERE id = 1;", "function f(x) { return x * 2; }",
]


def make_tokenizer(directory, vocab_size=VOCAB):
    """A byte-level BPE tokenizer with <pad>=0, <eos>=1, <bos>=2 (as Gemma orders them), BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAIN_TEXT * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f)
    return tok


def hf_config(family, **overrides):
    """A small transformers config of `family` (vocab 320, 2-3 layers, width 64)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if family == "llama":
        cfg = tf.LlamaConfig(**common, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1e6)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**{**common, "num_key_value_heads": 1}, head_dim=16, hidden_act="gelu", rms_norm_eps=1e-6)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6)
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 4, "num_key_value_heads": 1}, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=5, sliding_window_pattern=2,
                                  rope_theta=1e6, rope_local_base_freq=1e4, rms_norm_eps=1e-6)
    elif family == "phi3":
        cfg = tf.Phi3Config(**{**common, "num_key_value_heads": 4}, sliding_window=6, tie_word_embeddings=False,
                            rms_norm_eps=1e-5)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_checkpoint(family, directory, seed=0, dtype=torch.float32, **overrides):
    """Write a random HF checkpoint + tokenizer of `family` to `directory`; returns the HF model (eager attention)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 / 0 in HF: randomise them so a wrong norm formula shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.2)
    model = model.to(dtype).eval()
    model.save_pretrained(directory, safe_serialization=True)
    make_tokenizer(directory)
    return model
