"""The router's logits: the PyTorch twin against float64 (CPU), and the CUDA kernels against float64, forward and
backward, at odd and empty shapes (GPU only)."""

import pytest
import torch

from kernel_utils import built, cuda, poison, rel_err
from kernels.router_logits import router_logits, router_logits_ref


def float64_grads(x, w, dlogits):
    """logits = x w^T and its gradients dx = dlogits w, dw = dlogits^T x, in float64."""
    x, w, dlogits = x.double(), w.double(), dlogits.double()
    return x @ w.t(), dlogits @ w, dlogits.t() @ x


def test_ref_matches_float64_and_ignores_autocast():
    x = torch.randn(13, 24, requires_grad=True)
    w = torch.randn(5, 24, requires_grad=True)
    dlogits = torch.randn(13, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = router_logits_ref(x, w)
    assert logits.dtype == torch.float32
    dx, dw = torch.autograd.grad(logits, (x, w), dlogits)
    for out, ref in zip((logits, dx, dw), float64_grads(x.detach(), w.detach(), dlogits)):
        assert rel_err(out, ref) < 1e-6


@cuda
@pytest.mark.parametrize('x_dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize('N,C,E,offset', [(1, 8, 1, 0), (7, 13, 3, 0), (300, 512, 8, 0), (4096, 768, 8, 0),
                                          (33, 512, 20, 0), (65, 96, 64, 0), (40, 512, 8, 1), (0, 64, 8, 0)])
def test_cuda_matches_float64(N, C, E, offset, x_dtype, tol):
    """Logits in fp32 from fp32 or bf16 x; dx rounded once to x's dtype (bf16: tol 1e-2), dw in fp32. E = 20 and
    64 take the experts in passes of 8; offset 1 starts x one element past a 16-byte boundary (the scalar path)."""
    built()
    x = torch.randn(N * C + offset, device='cuda').to(x_dtype)[offset:].view(N, C).requires_grad_()
    w = torch.randn(E, C, device='cuda', requires_grad=True)
    dlogits = torch.randn(N, E, device='cuda')
    refs = float64_grads(x.detach(), w.detach(), dlogits)
    poison()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        logits = router_logits(x, w)
    assert logits.dtype == torch.float32 and logits.shape == (N, E)
    poison()
    dx, dw = torch.autograd.grad(logits, (x, w), dlogits)
    assert dx.dtype == x_dtype and dw.dtype == torch.float32
    assert rel_err(logits, refs[0]) < 1e-5
    assert rel_err(dx, refs[1]) < tol
    assert rel_err(dw, refs[2]) < 1e-5  # N = 0: all zeros


@cuda
def test_opcheck_and_compile():
    built()
    x = torch.randn(64, 96, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 96, device='cuda', requires_grad=True)
    torch.library.opcheck(torch.ops.ava.router_logits.default, (x, w))
    fn = lambda x: router_logits(x, w).softmax(-1).square().sum()  # noqa: E731
    eager, compiled = fn(x), torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, x)[0], torch.autograd.grad(eager, x)[0])
