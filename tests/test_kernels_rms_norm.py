"""RMSNorm: the PyTorch twin against a float64 formula with hand-derived gradients (CPU), and the
CUDA kernels against the twin in float64 (GPU only)."""

import pytest
import torch

from kernel_utils import built, cuda, poison, rel_err
from ava_kernels.rms_norm import rms_norm, rms_norm_ref


def rms_norm_float64(x, w, eps, dy):
    """y and the hand-derived gradients dx = r w dy - r^3/C x sum(w dy x), dw = sum_rows dy x r."""
    x, w, dy = x.double(), w.double(), dy.double()
    r = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    dx = r * w * dy - r.pow(3) / x.size(-1) * x * (w * dy * x).sum(-1, keepdim=True)
    return x * r * w, dx, (dy * x * r).reshape(-1, x.size(-1)).sum(0)


@pytest.mark.parametrize('shape', [(1, 8), (3, 7), (2, 5, 64)])
def test_ref_matches_float64_formula(shape):
    x = torch.randn(shape, requires_grad=True)
    w = (torch.rand(shape[-1]) + 0.5).requires_grad_()
    dy = torch.randn(shape)
    y = rms_norm_ref(x, w, 1e-6)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y64, dx64, dw64 = rms_norm_float64(x.detach(), w.detach(), 1e-6, dy)
    for out, ref in ((y, y64), (dx, dx64), (dw, dw64)):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize('x_dtype,autocast,tol', [(torch.float32, False, 1e-5),
                                                  (torch.float32, True, 1e-2),
                                                  (torch.bfloat16, False, 1e-2)])
@pytest.mark.parametrize('rows,C,offset', [(1, 8, 0), (7, 13, 0), (300, 512, 0), (4096, 768, 0),
                                           (33, 512, 1), (0, 64, 0)])
def test_cuda_matches_ref(rows, C, offset, x_dtype, autocast, tol):
    """offset 1 starts x one element past a 16-byte boundary, which forces the scalar path."""
    built()
    x = (torch.randn(rows * C + offset, device='cuda').to(x_dtype)[offset:].view(rows, C)
         .requires_grad_())
    w = (torch.rand(C, device='cuda') + 0.5).requires_grad_()
    dy = torch.randn(rows, C, device='cuda')
    y64, dx64, dw64 = rms_norm_float64(x.detach(), w.detach(), 1e-6, dy)
    poison()
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        y = rms_norm(x, w, 1e-6)
    assert y.dtype == (torch.bfloat16 if autocast else x_dtype)
    poison()
    dx, dw = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    assert dx.dtype == x_dtype and dw.dtype == torch.float32
    if rows:
        for out, ref in ((y, y64), (dx, dx64), (dw, dw64)):
            assert rel_err(out, ref) < tol


@cuda
def test_opcheck_and_compile():
    built()
    x = torch.randn(6, 40, 64, device='cuda', requires_grad=True)
    w = torch.rand(64, device='cuda', requires_grad=True)
    torch.library.opcheck(torch.ops.ava.rms_norm.default, (x, w, 1e-6, torch.bfloat16))
    fn = lambda x: rms_norm(x, w, 1e-6).square().sum()  # noqa: E731
    eager, compiled = fn(x), torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, x)[0],
                               torch.autograd.grad(eager, x)[0])


@cuda
def test_cuda_bf16_weight_forward():
    """A bf16 model's norm weight is read as it is (no cast per call): the same rows as the float64
    formula."""
    built()
    x = torch.randn(5, 512, device='cuda', dtype=torch.bfloat16)
    w = (torch.rand(512, device='cuda') + 0.5).bfloat16()
    y64 = rms_norm_float64(x, w, 1e-6, torch.zeros(5, 512, device='cuda'))[0]
    poison()
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16 and rel_err(y, y64) < 1e-2
