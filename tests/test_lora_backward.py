"""minilora/kernels/lora_backward.py: the two-launch LoRA weight gradients against float64, CPU interpreter and GPU."""
import pytest
import torch

from minilora.kernels.lora_backward import lora_grads, lora_grads_reference

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def _assert_grads_close(x, g, a, b, s, what):
    """Each gradient within a few roundings of x's dtype of the float64 result, per element, scaled by the sum of
    absolute products: A and B are rounded to x's dtype, and xa / dxa once more before the second product."""
    ref_A, ref_B = lora_grads_reference(x, g, a, b, s)
    got_A, got_B = lora_grads(x, g, a, b, s)
    x64, g64, a64, b64 = x.double().abs(), g.double().abs(), a.double().abs(), b.double().abs()
    scale_A, scale_B = s * (g64 @ b64).t() @ x64, s * g64.t() @ (x64 @ a64.t())
    eps = EPS[x.dtype]
    for name, got, ref, scale in (("dA", got_A, ref_A, scale_A), ("dB", got_B, ref_B, scale_B)):
        assert got.dtype == torch.float32 and got.shape == ref.shape, (name, got.dtype, got.shape)
        err = (got.double() - ref).abs()
        bound = 4 * eps * scale + 1e-30
        assert not (err > bound).any(), (f"{what} {name}: {int((err > bound).sum())} of {err.numel()} outside; "
                                         f"max diff {err.max().item():.3g}, max bound {bound.max().item():.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n,r", [(37, 70, 45, 5), (16, 32, 32, 16), (50, 100, 19, 1)])  # off every tile size
def test_lora_grads_match_float64(m, k, n, r, dtype):
    x, g = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    a, b = torch.randn(r, k) / k ** 0.5, torch.randn(n, r) / r ** 0.5
    _assert_grads_close(x, g, a, b, 0.75, f"{m}x{k}x{n} r={r} {dtype}")


def test_lora_grads_validate_inputs():
    x, g, a, b = torch.randn(8, 32), torch.randn(8, 16), torch.randn(4, 32), torch.randn(16, 4)
    with pytest.raises(ValueError, match=r"g is torch.float16 \[8, 16\].*expected contiguous torch.float32"):
        lora_grads(x, g.half(), a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_B is torch.float32 \[16, 3\]"):
        lora_grads(x, g, a, b[:, :3].contiguous(), 1.0)
    with pytest.raises(ValueError, match=r"x \(8, 32\) and g \(7, 16\)"):
        lora_grads(x, g[:7], a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_A .*\(contiguous=False\)"):
        lora_grads(x, g, torch.randn(32, 4).t(), b, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n,r", [(4096, 3072, 1024, 16), (4096, 8192, 3072, 16), (1000, 3072, 8192, 64),
                                     (257, 192, 70, 5)])
def test_lora_grads_match_float64_gpu(device, m, k, n, r, dtype):
    x, g = torch.randn(m, k, device=device).to(dtype), torch.randn(m, n, device=device).to(dtype)
    a, b = torch.randn(r, k, device=device) / k ** 0.5, torch.randn(n, r, device=device) / r ** 0.5
    _assert_grads_close(x, g, a, b, 2.0, f"{m}x{k}x{n} r={r} {dtype}")
