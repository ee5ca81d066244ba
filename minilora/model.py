"""The one decoder for every supported family: Llama 3.2 / SmolLM2, Qwen2.5, Gemma, Gemma 2, Gemma 3, Phi-3.

Read top to bottom: RMSNorm, RoPE, Attention (GQA, SDPA), MLP (SwiGLU/GeGLU), Block, Transformer, KVCache.
Family differences are `ModelConfig` fields (see config.py). Parameter names are the Hugging Face ones, so a
checkpoint loads almost as the identity and LoRA targets are the names PEFT users type. Checked against
transformers' modeling_{llama,qwen2,gemma,gemma2,gemma3,phi3}.py by tests/test_model_parity.py.

Shape letters: B batch, T tokens (S: key length with a cache), D model dim, H heads, Hkv kv heads,
Dh head dim, V vocab, F MLP inner dim.

Attention masking is one rule for training, packing and generation: query q may see key k iff
  segments[k] == segments[q] and positions[k] <= positions[q] and positions[q] - positions[k] < window.
Packed rows get one segment id per example (positions restart at 0), padding gets its own segment,
so nothing leaks across examples and no row is ever fully masked.

On CUDA (backend setting "triton", the default there; see minilora/kernels/backend.py) RMSNorm, RoPE, the GLU and
the loss run as the Triton kernels of minilora/kernels/; everywhere else the plain-torch lines below run. Both give
the same numbers up to rounding (tests/test_train_kernels.py).
"""
import functools
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import ModelConfig, RopeConfig


def use_triton(x):
    """True when `x` should go through the Triton training kernels: on CUDA, unless the backend is "torch" or
    torch.compile is tracing (it fuses the plain torch ops with their neighbours, which it cannot do across
    our kernels; generate.py's compiled decode step)."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return False
    from minilora.kernels.backend import resolve_backend

    return resolve_backend("auto", x.device) == "triton"


def _project(layer, joined, x):
    """layer(x), through `joined` (nf4.JoinedLinear4bit of that one layer: generate.join_projections) while it
    applies: the same 4-bit weight, its absmax read decoded."""
    if joined is not None and joined.applies_to(layer):
        return joined(x)[0]
    return layer(x)


@functools.lru_cache(maxsize=None)
def triton_ops():
    """The Triton training kernels, imported on first use so that CPU-only installs never need triton."""
    from minilora.kernels import cross_entropy, decode_attention_fused, glu, rmsnorm, rope

    return dict(rms_norm=rmsnorm.rms_norm_triton, add_rms_norm=rmsnorm.add_rms_norm_triton, rope=rope.rope_triton,
                swiglu=glu.swiglu_triton, geglu=glu.geglu_triton,
                linear_cross_entropy=cross_entropy.linear_cross_entropy_triton, rope_cos_sin=rope.rope_cos_sin_triton,
                decode_attention_fused=decode_attention_fused.decode_attention_fused)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, unit_offset=False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x):
        if use_triton(x):
            return triton_ops()["rms_norm"](x, self.weight, self.eps, self.unit_offset)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma: scale by (1 + w) in fp32, cast once at the end
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)  # Llama: cast back to the input dtype, then scale

    def add_and_norm(self, x, delta):
        """(x + delta, this norm of it): a residual add and the norm after it, one kernel when decoding on CUDA
        (at batch 1 a decode step's time goes to launches; the sum is rounded as torch's add rounds it)."""
        if use_triton(x) and not torch.is_grad_enabled():
            return triton_ops()["add_rms_norm"](x, delta, self.weight, self.eps, self.unit_offset)
        x = x + delta
        return x, self(x)


def rope_inverse_frequencies(rope: RopeConfig, head_dim):
    """inv_freq[j] = theta^(-2j/Dh), rescaled for "linear" and "llama3" (transformers modeling_rope_utils)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, positions, dtype):
    """cos, sin of shape (B, T, Dh) in the "rotate_half" layout: angles computed in fp32, cast once."""
    angles = positions[..., None].float() * inv_freq.float()  # (B, T, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, Dh). Pairs dim j with j + Dh/2 (HF checkpoints expect this, not adjacent pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx):
        super().__init__()
        D, H, Hkv, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, Dh
        self.layer_idx, self.scale, self.softcap = layer_idx, config.scale, config.attn_logit_softcap
        self.window = config.layer_windows[layer_idx]
        self.q_proj = nn.Linear(D, H * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_bias)
        self.joined_qkv = None  # decoding: q/k/v as one 4-bit matmul (generate.join_projections)
        self.joined_o = None  # decoding: o_proj with its absmax decoded (generate.join_projections)
        if config.qk_norm:  # Gemma 3: per-head RMSNorm of q and k before RoPE
            self.q_norm = RMSNorm(Dh, config.rms_norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(Dh, config.rms_norm_eps, config.norm_unit_offset)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        if self.joined_qkv is not None and self.joined_qkv.applies_to(self.q_proj, self.k_proj, self.v_proj):
            q, k, v = self.joined_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cache is not None and T == 1 and cache.decodes_in_kernels(x):
            out = self._decode_one_token(q, k, v, cos, sin, cache)
            return _project(self.o_proj, self.joined_o, out.reshape(B, 1, -1))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, Dh), (B, Hkv, T, Dh)
        if use_triton(q):
            q, k = triton_ops()["rope"](q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, Dh)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        else:
            out = self._softcapped_attention(q, k, v, mask)
        return _project(self.o_proj, self.joined_o, out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _decode_one_token(self, q, k, v, cos, sin, cache):
        """Attention of one new token per row (q, k, v: (B, 1, width)) over the cache in one Triton launch
        (kernels/decode_attention_fused.py: RoPE, cache write and attention under the masking rule read from the
        cache's positions and segments) where the torch path takes eight kernels or more."""
        B = q.shape[0]
        if hasattr(self, "q_norm"):
            q = self.q_norm(q.view(B, 1, self.n_heads, self.head_dim))
            k = self.k_norm(k.view(B, 1, self.n_kv_heads, self.head_dim))
        keys, values = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        return triton_ops()["decode_attention_fused"](
            q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1), cos[:, 0], sin[:, 0], keys, values,
            cache.key_positions, cache.key_segments, cache.slot, self.scale, self.softcap, self.window)

    def _softcapped_attention(self, q, k, v, mask):
        """Gemma 2: scores = cap * tanh(scores / cap) after scaling, before the mask; softmax in fp32."""
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, H, T, S)
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D, Fd, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(D, Fd, bias=bias)
        self.up_proj = nn.Linear(D, Fd, bias=bias)
        self.down_proj = nn.Linear(Fd, D, bias=bias)
        self.activation = config.activation
        self.joined_gate_up = None  # decoding: gate/up as one 4-bit matmul (generate.join_projections)
        self.joined_down = None  # decoding: down_proj with its absmax decoded (generate.join_projections)

    def forward(self, x):
        joined = self.joined_gate_up is not None and self.joined_gate_up.applies_to(self.gate_proj, self.up_proj)
        if joined and self.activation != "gelu" and use_triton(x) and self.joined_gate_up.fuses_glu(x):
            return self._down(self.joined_gate_up.glu(x, self.activation))  # gate/up GEMV + GLU in one launch
        if joined:
            gate, up = (part.contiguous() for part in self.joined_gate_up(x))  # views of one result: copies if > 1 row
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.activation != "gelu" and use_triton(x):
            glu = triton_ops()["swiglu" if self.activation == "silu" else "geglu"]
            return self._down(glu(gate, up))
        if self.activation == "silu":
            gate = F.silu(gate)  # SwiGLU
        else:  # GeGLU; Gemma uses the tanh approximation
            gate = F.gelu(gate, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self._down(gate * up)

    def _down(self, x):
        return _project(self.down_proj, self.joined_down, x)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx):
        super().__init__()
        eps, offset = config.rms_norm_eps, config.norm_unit_offset
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset)
        # In Llama/Qwen2/Gemma/Phi-3 this is the pre-MLP norm; in Gemma 2/3 it normalises the attention output.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset)
        if config.sandwich_norms:  # Gemma 2/3: four norms per block
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.sandwich = config.sandwich_norms

    def forward(self, x, cos, sin, mask, cache=None, recomputing=False, delta=None, defer_add=False):
        if recomputing:
            return self.recompute(x, cos, sin, mask)
        if defer_add:
            return self._forward_deferred(x, delta, cos, sin, mask, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x, h = self.post_attention_layernorm.add_and_norm(x, attended)
        return x + self.mlp(h)

    def _forward_deferred(self, x, delta, cos, sin, mask, cache):
        """forward(x + delta) as (x', d) with forward(x + delta) = x' + d: the block's last residual add is left to
        the caller's next norm (RMSNorm.add_and_norm), as is this block's first (`delta`, None for the first
        block). Without autograd only (Llama/Qwen2/Gemma/Phi-3 norms): one kernel per block fewer in a decode
        step, and no torch kernel breaking the chain of kernels that start early (minilora/kernels/pdl.py). Reached
        through forward (defer_add=True), so module hooks (FSDP2's all-gather) run as for any call."""
        if delta is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm.add_and_norm(x, delta)
        x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn(h, cos, sin, mask, cache))
        return x, self.mlp(h)

    def recompute(self, x, cos, sin, mask):
        """The forward again, for a gradient checkpoint; only what it saves for the backward that follows counts.
        down_proj's output feeds nothing but the discarded block output (in Gemma 2/3 a norm saves it, hence not
        there), so a LoRA down_proj skips its base GEMM, a fifth of the block's forward FLOPs at Llama shapes; and
        the LoRA layers keep the merged weight they make for the backward (minilora/kernels/lora.py `keep_weight`)."""
        lora = [m for m in self.modules() if hasattr(m, "keep_weight")]
        for m in lora:
            m.keep_weight = True
        self.mlp.down_proj.output_unused = not self.sandwich
        try:
            return self.forward(x, cos, sin, mask)
        finally:
            for m in lora:
                m.keep_weight = False
            self.mlp.down_proj.output_unused = False


class Backbone(nn.Module):
    """Holds what HF checkpoints call `model.*`: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        # With checkpointing on, the last `uncheckpointed_blocks` blocks keep their activations instead of
        # recomputing them: each costs one block's activations and saves one block's recomputation. The last
        # ones, because the backward frees them before the first recomputation needs memory.
        self.uncheckpointed_blocks = 0
        self.reset_rope()

    def reset_rope(self, device=None):
        """(Re)compute the RoPE inverse frequencies; buffers are not in checkpoints."""
        c = self.config
        self.register_buffer("inv_freq", rope_inverse_frequencies(c.rope, c.head_dim).to(device), persistent=False)
        if c.local_rope is not None:  # Gemma 3: sliding layers use their own base
            self.register_buffer("inv_freq_local", rope_inverse_frequencies(c.local_rope, c.head_dim).to(device),
                                 persistent=False)

    def forward(self, input_ids, positions=None, segments=None, cache=None):
        """input_ids (B, T) -> logits (B, T, V) in fp32 for the loss / sampling."""
        return self.logits(self.hidden_states(input_ids, positions, segments, cache))

    def loss(self, input_ids, labels, positions=None, segments=None):
        """Sum of the token cross-entropies where labels != -100 (labels already shifted: labels[t] is the
        target at position t). On CUDA the fused kernel never materialises the (tokens x V) logits."""
        hidden = self.hidden_states(input_ids, positions, segments)
        if use_triton(hidden) and type(self.lm_head) is nn.Linear:  # a LoRA-wrapped head takes the plain path
            return triton_ops()["linear_cross_entropy"](hidden.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                                         self.config.final_logit_softcap)
        logits = self.logits(hidden)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")

    def logits(self, hidden):
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)  # Gemma 2

    def hidden_states(self, input_ids, positions=None, segments=None, cache=None):
        """The final-normed hidden states (B, T, D); `positions`/`segments` (B, T) as in the module docstring."""
        c = self.config
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if c.embedding_scale is not None:  # Gemma: sqrt(D) rounded to the model dtype first, as HF does
            x = x * torch.tensor(c.embedding_scale, dtype=x.dtype)
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if segments is None and cache is None:
            segments_q = None
        else:
            segments_q = segments if segments is not None else torch.ones_like(input_ids)
        if cache is not None:
            cache.append_positions(positions, segments_q)
        cos_sin = triton_ops()["rope_cos_sin"] if use_triton(x) else rope_cos_sin  # one launch instead of seven
        rope_tables = {"global": cos_sin(self.inv_freq, positions, x.dtype)}
        if c.local_rope is not None:
            rope_tables["local"] = cos_sin(self.inv_freq_local, positions, x.dtype)
        masks = {}
        in_kernels = cache is not None and T == 1 and cache.decodes_in_kernels(x)  # masks read from the cache
        checkpointed = 0  # blocks run under torch.utils.checkpoint: the first ones
        if self.gradient_checkpointing and self.training:
            checkpointed = len(self.model.layers) - self.uncheckpointed_blocks
        # without autograd each residual add joins the norm after it (Block._forward_deferred): `delta` is pending
        deferred, delta = not c.sandwich_norms and not torch.is_grad_enabled(), None
        for i, layer in enumerate(self.model.layers):
            window = c.layer_windows[i]
            if window not in masks:
                masks[window] = None if in_kernels else build_mask(positions, segments_q, window, cache)
                if cache is not None and masks[window] is not None and c.attn_logit_softcap is None:
                    # SDPA turns a boolean mask into its additive form (0 / -inf in the query dtype) inside every
                    # call: three kernels per layer in a decode step; once per forward gives the same numbers
                    masks[window] = torch.zeros(masks[window].shape, dtype=x.dtype,
                                                device=x.device).masked_fill_(~masks[window], float("-inf"))
            cos, sin = rope_tables["local" if (c.local_rope is not None and window is not None) else "global"]
            if deferred:
                x, delta = layer(x, cos, sin, masks[window], cache, delta=delta, defer_add=True)
            elif i < checkpointed:
                x = torch.utils.checkpoint.checkpoint(_recomputable(layer), x, cos, sin, masks[window], cache,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[window], cache)
        if cache is not None:
            cache.length += T
        if delta is not None:
            return self.model.norm.add_and_norm(x, delta)[1]
        return self.model.norm(x)


def _recomputable(block):
    """block's forward for torch.utils.checkpoint: the first call is the forward, later ones recompute it."""
    calls = 0

    def run(*args):
        nonlocal calls
        calls += 1
        return block(*args, recomputing=calls > 1)

    return run


def build_mask(positions, segments, window, cache=None):
    """Boolean (B, 1, T, S) mask, True = may attend; None means plain causal (SDPA's fast path)."""
    if cache is not None:
        key_positions, key_segments = cache.key_positions, cache.key_segments  # (B, S)
    elif segments is None and window is None:
        return None
    else:
        key_positions = positions
        key_segments = segments if segments is not None else torch.ones_like(positions)
        segments = key_segments
    q_pos, k_pos = positions[:, None, :, None], key_positions[:, None, None, :]
    mask = (k_pos <= q_pos) & (segments[:, None, :, None] == key_segments[:, None, None, :])
    if window is not None:
        mask &= (q_pos - k_pos) < window
    return mask


class KVCache:
    """Preallocated keys and values for every layer, plus the position and segment of every slot.

    Shapes never change while decoding (the whole buffer is attended to, unfilled slots masked out by
    segment -1), so a decode step can be captured in a CUDA graph.
    """

    def __init__(self, config: ModelConfig, batch_size, max_length, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.key_positions = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.key_segments = torch.full((batch_size, max_length), -1, dtype=torch.long, device=device)
        self.max_length, self.length = max_length, 0

    def decodes_in_kernels(self, x):
        """True when a one-token forward on x attends through minilora/kernels/decode_attention_fused.py (generate.py's
        StaticKVCache on CUDA); this cache's Python write position cannot be read by a kernel."""
        return False

    def append_positions(self, positions, segments):
        T = positions.shape[1]
        if self.length + T > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {self.length} + {T} do not fit.")
        self.key_positions[:, self.length:self.length + T] = positions
        self.key_segments[:, self.length:self.length + T] = segments

    def update(self, layer_idx, k, v):
        T = k.shape[2]
        self.keys[layer_idx][:, :, self.length:self.length + T] = k
        self.values[layer_idx][:, :, self.length:self.length + T] = v
        return self.keys[layer_idx], self.values[layer_idx]
