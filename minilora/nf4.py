"""NF4: the 4-bit NormalFloat weight format of QLoRA, in plain torch, bit-identical to bitsandbytes.

Reference: Dettmers et al., "QLoRA" (arXiv 2305.14314), and bitsandbytes 0.50.2
`functional.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=...)`, whose bytes
`tests/test_nf4.py` compares against with `torch.equal`. `docs/nf4.md` walks one block through by hand.

The format, for a weight of n elements taken in row-major order:
  - blocks of 64 elements; each block keeps absmax = max |w| in fp32;
  - each element becomes the index (0..15) of the nearest of the 16 NF4 values to w / absmax;
  - two indices per byte, the first element in the high nibble; n odd pads one 0.0 (index 7);
  - double quantization (`compress_statistics=True`): the fp32 absmax vector minus its mean ("offset")
    is itself quantized to 8 bits in blocks of 256 with bitsandbytes' signed dynamic code, keeping one
    fp32 "nested absmax" per 256 blocks. That brings the scale cost from 0.5 to about 0.127 bits/weight.
Dequantization is `code[q] * absmax` computed in fp32, then cast once to the output dtype.

bitsandbytes rounds slightly differently on CPU and CUDA; `_BNB_CUDA` marks the few lines that copy
whichever device the tensor is on, so the bytes match bitsandbytes run on the same device.

Also here: `Linear4bit`, the frozen 4-bit linear layer; `JoinedLinear4bit`, several of them read as one for
decoding; and the conversion to and from the Hugging Face + bitsandbytes checkpoint layout for one linear
(`to_hf_state` / `from_hf_state`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn as nn

from minilora.errors import WeightsError

BLOCKSIZE = 64  # QLoRA / bitsandbytes default for NF4
NESTED_BLOCKSIZE = 256  # bitsandbytes: absmax is double-quantized in blocks of 256
MAX_NUMEL = 2**31 - 1  # the kernels index with int32
_CHUNK = BLOCKSIZE * 2**14  # elements quantized at a time (a multiple of 64, so of the block)

# The 16 NF4 values: quantiles of N(0, 1) normalised to [-1, 1], 8 negative, 0, 7 positive.
# bitsandbytes `get_4bit_type("nf4")` hard-codes the same fp32 numbers (from `create_normal_map`).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor (bitsandbytes' `quant_map`)."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map()`), 256 sorted fp32 values.

    Dettmers 2015, "8-bit approximations": for exponent e = 0..6 the magnitudes 10**(e-6) * (midpoints
    of 2**e + 1 points spread evenly over [0.1, 1]), both signs, plus 0 and 1. Same fp32 arithmetic as
    bitsandbytes, so the values are bit-identical (tested).
    """
    data = []
    for e in range(7):
        boundaries = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + e)) * means).tolist()
        data += (-(10 ** (-6 + e)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@dataclass
class NF4State:
    """A quantized weight: everything needed to dequantize it, in bitsandbytes' layout.

    packed:        uint8, shape ((numel + 1) // 2, 1), two 4-bit indices per byte, first in the high nibble
    absmax:        fp32 (blocks,) or, when double-quantized, uint8 indices into `nested_code`
    nested_absmax: fp32 (ceil(blocks / 256),) scale of each group of 256 absmax values, or None
    nested_code:   fp32 (256,) the 8-bit dynamic code, or None
    offset:        fp32 0-dim tensor, the mean that was subtracted from absmax, or None
    code:          fp32 (16,) the NF4 values
    shape, dtype:  of the original weight (dtype is what `dequantize_nf4` returns by default)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize: int = BLOCKSIZE
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device) -> "NF4State":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4State(move(self.packed), move(self.absmax), move(self.code), self.shape, self.dtype,
                        move(self.nested_absmax), move(self.nested_code), move(self.offset),
                        self.blocksize, self.nested_blocksize)


# bitsandbytes' CUDA kernels and its CPU code (torch for 4-bit, a C lookup table for 8-bit) round a few
# corner cases differently; we copy the device the tensor is on.
def _bnb_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _blocks_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| of each block of `blocksize` (the last one may be short), fp32."""
    pad = -flat.numel() % blocksize
    padded = torch.nn.functional.pad(flat, (0, pad))  # zeros do not change a max of |x|
    return padded.view(-1, blocksize).abs().amax(dim=1)


def _quantize_4bit_indices(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values -> (uint8 NF4 index per value, fp32 absmax per block), as bitsandbytes rounds."""
    n = flat.numel()
    absmax = _blocks_absmax(flat, blocksize)
    scale = absmax.repeat_interleave(blocksize)[:n]
    if _bnb_cuda(flat):
        # CUDA kernel: x * (1/absmax) (an all-zero block gives NaN, which its decision tree maps to 0)
        scaled = flat * (1.0 / scale)
    else:
        # bitsandbytes' torch fallback: clamp absmax to 1e-38 first, and store that for a short last
        # block (so an all-zero short block reads back 1e-38, not 0)
        if n % blocksize:
            absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled = torch.clamp(flat * (1.0 / scale.clamp(min=1e-38)), -1, 1)
    midpoints = (nf4_code(flat.device)[:-1] + nf4_code(flat.device)[1:]) / 2  # == bnb's CUDA constants
    q = torch.bucketize(scaled, midpoints)  # a value exactly on a midpoint goes down, as in bitsandbytes
    if _bnb_cuda(flat):
        q = torch.where(scaled.isnan(), 0, q)
    return q.to(torch.uint8), absmax


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 indices 0..15 (n,) -> uint8 bytes ((n + 1) // 2, 1), element 2i in the high nibble."""
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), 7)])  # bitsandbytes pads with 0.0, whose index is 7
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (bytes, 1) uint8 -> (numel,) int64 indices."""
    flat = packed.reshape(-1).to(torch.int64)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel]


def _quantize_8bit_dynamic(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes `quantize_blockwise(x, blocksize)`: fp32 (n,) -> (uint8 (n,), fp32 absmax, code)."""
    code = dynamic_code(x.device)
    absmax = _blocks_absmax(x, blocksize)
    scale = absmax.repeat_interleave(blocksize)[: x.numel()]
    normed = torch.where(scale == 0, 0.0, x * (1.0 / scale))
    midpoints = (code[:-1] + code[1:]) * 0.5
    if _bnb_cuda(x):
        q = torch.bucketize(normed, midpoints)  # CUDA: binary search, then nearest of the two neighbours
    else:
        # bitsandbytes' CPU kernel rounds through a lookup table: [-1, 1] cut into 65536 bins, each
        # bin mapped to the code nearest its left edge. Not always the nearest code (off by one for
        # about 1 value in 1000), but it is what bitsandbytes stores, so we do the same.
        bin_values = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=x.device)) / 65535
        table = torch.searchsorted(midpoints, bin_values)  # number of midpoints below each bin value
        q = table[((torch.clamp(normed, -1, 1) + 1) * 0.5 * 65535 + 0.5).long()]  # fp32, then truncate
    q = torch.where(scale == 0, 0, q)  # an all-zero block stores index 0 (both devices)
    return q.to(torch.uint8), absmax, code


def quantize_nf4(weight: torch.Tensor, compress_statistics: bool = True) -> NF4State:
    """Quantize a float tensor to NF4 on its own device (blocksize 64), as bitsandbytes does.

    compress_statistics: also quantize absmax to 8 bits (QLoRA's "double quantization").
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4: weight dtype is {weight.dtype}; expected float32, float16 or bfloat16")
    if weight.numel() == 0 or weight.numel() > MAX_NUMEL:
        raise ValueError(f"quantize_nf4: weight has {weight.numel()} elements; expected 1 to {MAX_NUMEL}")
    # Blocks are independent, so go a chunk of blocks at a time: the fp32/int64 temporaries then stay
    # about 20 MB whatever the weight size (the loader quantizes a 3B model layer by layer on the GPU).
    flat = weight.detach().reshape(-1)
    packed, absmax = [], []
    for start in range(0, flat.numel(), _CHUNK):
        q, chunk_absmax = _quantize_4bit_indices(flat[start:start + _CHUNK].float(), BLOCKSIZE)
        packed.append(pack_nibbles(q))
        absmax.append(chunk_absmax)
    absmax = torch.cat(absmax)
    state = NF4State(torch.cat(packed), absmax, nf4_code(weight.device), weight.shape, weight.dtype)
    if compress_statistics:
        offset = absmax.mean()  # same torch reduction as bitsandbytes, so the same fp32 bits
        state.absmax, state.nested_absmax, state.nested_code = _quantize_8bit_dynamic(absmax - offset,
                                                                                      NESTED_BLOCKSIZE)
        state.offset = offset
    return state


def dequantize_absmax(state: NF4State) -> torch.Tensor:
    """The fp32 absmax of every 64-block (undoing the double quantization if there is one)."""
    if not state.nested:
        return state.absmax.float()
    scale = state.nested_absmax.repeat_interleave(state.nested_blocksize)[: state.absmax.numel()]
    # two fp32 roundings, a multiply then an add, as bitsandbytes (no fused multiply-add)
    return state.nested_code[state.absmax.long()] * scale + state.offset


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4 -> float tensor of `state.shape`: code[q] * absmax in fp32, cast once to `dtype`."""
    q = unpack_nibbles(state.packed, state.numel)
    absmax = dequantize_absmax(state).repeat_interleave(state.blocksize)[: state.numel]
    return (state.code[q] * absmax).to(dtype or state.dtype).reshape(state.shape)


def _kernels_backend():
    """minilora/kernels/backend.py, imported on first use (it imports this file)."""
    from minilora.kernels import backend

    return backend


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: y = x @ dequant(W)^T + bias.

    The packed weight and its statistics are buffers (saved with the module, never trained);
    autograd gives the gradient for x (g @ W) and the bias, never for W. `backend` picks who does
    the 4-bit work: "torch" (this file), "triton" (kernels/), "bnb", or "auto" (see kernels/backend.py).
    """

    def __init__(self, state: NF4State, bias: torch.Tensor | None, dtype: torch.dtype, backend: str = "auto"):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit: weight shape {tuple(state.shape)}; expected (out_features, in_features)")
        self.out_features, self.in_features = state.shape
        self.weight_dtype = dtype  # the compute dtype the weight is dequantized to
        self.backend = backend
        self.quant_dtype, self.blocksize, self.nested_blocksize = state.dtype, state.blocksize, state.nested_blocksize
        self.register_buffer("weight_packed", state.packed)
        self.register_buffer("weight_absmax", state.absmax)
        self.register_buffer("weight_code", state.code)
        for name in ("nested_absmax", "nested_code", "offset"):
            self.register_buffer(f"weight_{name}", getattr(state, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, compress_statistics: bool = True,
                    backend: str = "auto", dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize `weight` (out, in) on its device; the float weight is not kept."""
        state = quantize_nf4(weight, compress_statistics)
        return cls(state, bias, dtype or weight.dtype, backend)

    def hold_packed_as_parameter(self, storage_dtype: torch.dtype = torch.uint8):
        """Turn the packed bytes into a frozen Parameter whose elements are `storage_dtype` (same bytes).

        Why: FSDP2's fully_shard shards Parameters and leaves buffers whole on every rank
        (minilora/distributed.py). A float storage dtype equal to the rest of the model's (bitsandbytes calls it
        `quant_storage`) makes every parameter of a sharded group one dtype: one flat all-gather, and a
        mixed-precision cast leaves the bytes alone. Falls back to uint8 when the byte count does not divide.
        """
        packed = self.weight_packed.detach()
        if packed.numel() % torch.empty((), dtype=storage_dtype).element_size() == 0:
            packed = packed.reshape(-1).view(storage_dtype)
        del self.weight_packed  # the buffer entry; the Parameter takes its name
        self.weight_packed = nn.Parameter(packed, requires_grad=False)

    @property
    def state(self) -> NF4State:
        """The NF4State view of the packed bytes and statistics (shares their storage)."""
        packed = self.weight_packed
        if packed.dtype != torch.uint8:  # held as a float Parameter for FSDP2 (hold_packed_as_parameter)
            packed = packed.view(torch.uint8).reshape(-1, 1)
        return NF4State(packed, self.weight_absmax, self.weight_code,
                        torch.Size((self.out_features, self.in_features)), self.quant_dtype,
                        self.weight_nested_absmax, self.weight_nested_code, self.weight_offset,
                        self.blocksize, self.nested_blocksize)

    def dequantize(self) -> torch.Tensor:
        """The weight as a float (out, in) tensor in the compute dtype (reference path)."""
        return dequantize_nf4(self.state, self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), computed in `weight_dtype`."""
        return _kernels_backend().linear_nf4(x.to(self.weight_dtype), self.state, self.bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.weight_dtype}, nested={self.weight_nested_absmax is not None}, backend={self.backend}")


class JoinedLinear4bit:
    """Linear4bit layers that read the same input, run as one 4-bit matmul: their rows stacked into one NF4 weight.

    For decoding, where each matmul launch has a fixed cost (benchmarks/RESULTS.md: ~4.7 µs per GEMV on an H100)
    that q/k/v and gate/up would otherwise pay three and two times. The layers' packed bytes move into one buffer
    that each layer then views (no second copy of the weights; one layer keeps its own); the absmax is kept
    decoded to fp32 (`dequantize_absmax`: the values the layers dequantize with), as double quantization's
    per-tensor offset does not concatenate. That is also why a single layer is worth "joining": the GEMV reads an
    fp32 absmax with fewer instructions than a double-quantized one (o_proj and down_proj: a Llama-3.2-3B decode
    step 1.1% faster for 1.6 MB more a block, benchmarks/RESULTS.md). Not an nn.Module on purpose: nothing here
    is saved, trained or moved with the model, and `applies_to` turns False once a layer is replaced (a LoRA
    wrapper), moved or re-stored, and under autograd. A joined (gate_proj, up_proj) also runs with the GLU as one
    launch (`glu`) where `fuses_glu` says so.
    """

    def __init__(self, layers):
        first = layers[0]
        for layer in layers:
            same = (type(layer) is Linear4bit and layer.in_features == first.in_features
                    and layer.weight_dtype == first.weight_dtype and layer.backend == first.backend
                    and layer.blocksize == first.blocksize and layer.quant_dtype == first.quant_dtype)
            whole_blocks = len(layers) == 1 or layer.in_features % layer.blocksize == 0  # concatenating absmax
            if not same or layer.weight_packed.dtype != torch.uint8 or not whole_blocks:
                raise ValueError(f"JoinedLinear4bit: {layer} cannot join {first} (needs Linear4bit layers of one input "
                                 "width, dtype and backend, uint8 packed bytes, rows a whole number of blocks)")
            if not torch.equal(layer.weight_code, first.weight_code):
                raise ValueError("JoinedLinear4bit: the layers use different 4-bit codes")
        packed = (first.weight_packed.reshape(-1) if len(layers) == 1 else
                  torch.cat([layer.weight_packed.reshape(-1) for layer in layers]))
        start = 0
        for layer in layers:
            count = layer.weight_packed.numel()
            layer.weight_packed = packed[start:start + count].view(layer.weight_packed.shape)  # the buffer, as a view
            start += count
        self.layers, self.widths = tuple(layers), [layer.out_features for layer in layers]
        self.dtype, self.backend = first.weight_dtype, first.backend
        self.state = NF4State(packed.reshape(-1, 1), torch.cat([dequantize_absmax(layer.state) for layer in layers]),
                              first.weight_code, torch.Size((sum(self.widths), first.in_features)), first.quant_dtype)
        self.bias = None
        if any(layer.bias is not None for layer in layers):
            self.bias = torch.cat([layer.bias.detach() if layer.bias is not None else
                                   torch.zeros(layer.out_features, dtype=self.dtype, device=packed.device)
                                   for layer in layers])
        self._packed_at = tuple(layer.weight_packed.data_ptr() for layer in layers)

    def holds(self, *layers) -> bool:
        """True when `layers` are the joined ones and still view the joined bytes."""
        return layers == self.layers and all(layer.weight_packed.data_ptr() == at
                                             for layer, at in zip(layers, self._packed_at))

    def applies_to(self, *layers) -> bool:
        """True when `holds(*layers)` and no gradient is wanted (training keeps each layer's own path)."""
        return not torch.is_grad_enabled() and self.holds(*layers)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each layer's output for x, as views of one (..., sum of out_features) result."""
        y = _kernels_backend().linear_nf4(x.to(self.dtype), self.state, self.bias, self.backend)
        return y.split(self.widths, dim=-1)

    def fuses_glu(self, x: torch.Tensor) -> bool:
        """True when `glu(x)` runs as one launch: two layers of equal width (gate, up) without bias, x one row,
        and the Triton backend (minilora/kernels/nf4_matmul.py's GEMV; other rows or backends keep the unfused path)."""
        backend = _kernels_backend()
        return (len(self.widths) == 2 and self.widths[0] == self.widths[1] and self.bias is None
                and x.shape[:-1].numel() == 1 and backend.resolve_backend(self.backend, x.device) == "triton")

    def glu(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """act(gate(x)) * up(x) for the joined (gate_proj, up_proj) of an MLP, activation "silu" (SwiGLU) or
        "gelu_tanh" (GeGLU): at one row, the 4-bit GEMV whose epilogue applies the GLU (`matmul_nf4_glu`)."""
        from minilora.kernels.nf4_matmul import matmul_nf4_glu

        return matmul_nf4_glu(x.to(self.dtype).contiguous(), self.state, activation)


# ---- Hugging Face + bitsandbytes checkpoint layout (bitsandbytes QuantState.as_dict(packed=True)) ----

_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # bitsandbytes writes "bfloat16", "float16", "float32"


def to_hf_state(module: Linear4bit, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors transformers + bitsandbytes save for one 4-bit linear, keyed `prefix.weight...`."""
    s = module.state
    meta = {"quant_type": "nf4", "blocksize": s.blocksize, "dtype": _dtype_name(s.dtype), "shape": list(s.shape)}
    out = {f"{prefix}.weight": s.packed, f"{prefix}.weight.absmax": s.absmax, f"{prefix}.weight.quant_map": s.code}
    if s.nested:
        out[f"{prefix}.weight.nested_absmax"] = s.nested_absmax
        out[f"{prefix}.weight.nested_quant_map"] = s.nested_code.clone()  # own storage: safetensors rejects shared
        meta.update(nested_blocksize=s.nested_blocksize, nested_dtype="float32", nested_offset=s.offset.item())
    # key order and json.dumps defaults as bitsandbytes' pack_dict_to_tensor, so the bytes are identical
    out[f"{prefix}.{_QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    if module.bias is not None:
        out[f"{prefix}.bias"] = module.bias.detach()
    return out


def from_hf_state(tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype, device=None,
                  backend: str = "auto") -> Linear4bit:
    """Build a Linear4bit from the tensors of `to_hf_state` / a bitsandbytes 4-bit checkpoint.

    dtype: the compute dtype (bias and dequantized weight). Raises WeightsError naming the key.
    """
    def get(key, required=True):
        full = f"{prefix}.{key}"
        if full not in tensors:
            if required:
                raise WeightsError(f"4-bit weight {prefix}: missing tensor '{full}' (bitsandbytes nf4 layout "
                                      f"needs weight, weight.absmax, weight.quant_map, weight.{_QUANT_STATE_KEY[7:]})")
            return None
        return tensors[full].to(device)

    try:
        meta = json.loads(bytes(get(_QUANT_STATE_KEY).cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"4-bit weight {prefix}: '{prefix}.{_QUANT_STATE_KEY}' is not JSON ({e})") from None
    if meta.get("quant_type") != "nf4":
        raise WeightsError(f"4-bit weight {prefix}: quant_type {meta.get('quant_type')!r}; only 'nf4' is supported")
    shape = torch.Size(meta["shape"])
    packed, absmax = get("weight"), get("weight.absmax")
    blocks = -(-shape.numel() // meta["blocksize"])
    if packed.dtype != torch.uint8 or packed.numel() != (shape.numel() + 1) // 2:
        raise WeightsError(f"4-bit weight {prefix}.weight: {packed.dtype} with {packed.numel()} bytes; expected "
                              f"uint8 with {(shape.numel() + 1) // 2} bytes for shape {list(shape)}")
    if absmax.numel() != blocks:
        raise WeightsError(f"4-bit weight {prefix}.weight.absmax: {absmax.numel()} values; expected {blocks} "
                              f"(one per {meta['blocksize']} of {shape.numel()} elements)")
    nested = "nested_offset" in meta
    state = NF4State(
        packed.reshape(-1, 1), absmax, get("weight.quant_map").float(), shape, getattr(torch, meta["dtype"]),
        nested_absmax=get("weight.nested_absmax") if nested else None,
        nested_code=get("weight.nested_quant_map") if nested else None,
        offset=torch.tensor(float(meta["nested_offset"]), device=device) if nested else None,
        blocksize=meta["blocksize"], nested_blocksize=meta.get("nested_blocksize", NESTED_BLOCKSIZE))
    return Linear4bit(state, get("bias", required=False), dtype, backend)
