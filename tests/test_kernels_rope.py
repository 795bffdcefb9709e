"""qkv split + RoPE: the PyTorch twin against complex-number rotation in float64 (CPU), and the CUDA kernels
against the twin in float64 (GPU only)."""

import pytest
import torch

from kernel_utils import built, cuda, poison, rel_err
from kernels.rope import qkv_rope, qkv_rope_ref


def angles(T, D, start=0, device='cpu'):
    """theta (T, D/2) float64: position * 10000^(-2j/D), positions start .. start+T-1."""
    pos = torch.arange(start, start + T, dtype=torch.float64, device=device)
    return pos[:, None] * 10000.0 ** (-2 * torch.arange(D // 2, dtype=torch.float64, device=device) / D)


def complex_rotate(x, theta):
    """x (..., T, D) as pairs x1 + i x2 (x1 the first D/2 channels) times e^{i theta}, theta (T, D/2)."""
    half = x.size(-1) // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag], dim=-1)


def heads(packed, H):
    """(B, T, 3C) -> 3 tensors (B, H, T, D), by indexing (not the permute the ref uses)."""
    B, T, C3 = packed.shape
    per_token = packed.reshape(B, T, 3, H, C3 // (3 * H))
    return [per_token[:, :, s].transpose(1, 2) for s in range(3)]


@pytest.mark.parametrize('B,T,H,D,start', [(1, 1, 1, 2, 0), (2, 7, 3, 6, 5), (2, 9, 2, 16, 100)])
def test_ref_matches_complex_rotation(B, T, H, D, start):
    theta = angles(T, D, start)
    qkv = torch.randn(B, T, 3 * H * D, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv_rope_ref(qkv, theta.cos(), theta.sin(), H)
    q_in, k_in, v_in = heads(qkv.detach(), H)
    torch.testing.assert_close(q, complex_rotate(q_in, theta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, complex_rotate(k_in, theta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, v_in, rtol=0, atol=0)
    # backward of a rotation is the inverse rotation e^{-i theta} (dx1 = dq1 cos + dq2 sin, ...); dv is copied
    grads = [torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3)]
    dqkv, = torch.autograd.grad((q, k, v), qkv, grads)
    dq_in, dk_in, dv_in = heads(dqkv, H)
    torch.testing.assert_close(dq_in, complex_rotate(grads[0], -theta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dk_in, complex_rotate(grads[1], -theta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dv_in, grads[2], rtol=0, atol=0)


def test_ref_fp32_tables_and_bf16_dtype():
    theta = angles(5, 8, 3)
    qkv = torch.randn(2, 5, 3 * 2 * 8, dtype=torch.bfloat16)
    q, k, v = qkv_rope_ref(qkv, theta.cos().float(), theta.sin().float(), 2)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape == (2, 2, 5, 8)
    expected = complex_rotate(heads(qkv.double(), 2)[0], theta)
    assert ((q.double() - expected).norm() / expected.norm()).item() < 1e-2


# --- CUDA kernels against the twin in float64 ---


def inputs(B, T, H, D, dtype, misaligned=False):
    """qkv (B, T, 3HD) requiring grad (starting one element past a 16-byte boundary if misaligned, which forces
    the scalar path), and fp32 cos, sin tables for positions 7 .. 7+T-1."""
    theta = angles(T, D, start=7, device='cuda')
    flat = torch.randn(B * T * 3 * H * D + misaligned, device='cuda').to(dtype)[int(misaligned):]
    return flat.view(B, T, 3 * H * D).requires_grad_(), theta.cos().float(), theta.sin().float()


CASES = [(1, 1, 1, 2, False), (2, 7, 3, 6, False), (3, 5, 2, 10, False), (4, 1024, 8, 64, False),
         (2, 33, 4, 128, False), (2, 3, 3, 16, False), (0, 4, 2, 8, False), (2, 0, 2, 64, False),
         (4, 1024, 8, 64, True), (2, 5, 2, 16, True)]


@cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize('B,T,H,D,misaligned', CASES)
def test_cuda_matches_ref(B, T, H, D, misaligned, dtype, tol):
    built()
    qkv, cos, sin = inputs(B, T, H, D, dtype, misaligned)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = qkv_rope_ref(qkv64, cos.double(), sin.double(), H)
    grads = [torch.randn(B, H, T, D, device='cuda').to(dtype) for _ in range(3)]
    ref_dqkv, = torch.autograd.grad(ref, qkv64, [g.double() for g in grads])
    poison()
    out = qkv_rope(qkv, cos, sin, H)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == dtype and o.is_contiguous()
        if r.numel():
            assert rel_err(o, r) < tol
    grads[0] = grads[0].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous dq: no layout assumed
    poison()
    dqkv, = torch.autograd.grad(out, qkv, grads)
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype
    if ref_dqkv.numel():
        assert rel_err(dqkv, ref_dqkv) < tol


@cuda
def test_opcheck():
    built()
    for dtype in (torch.float32, torch.bfloat16):
        qkv, cos, sin = inputs(2, 9, 3, 16, dtype)
        torch.library.opcheck(torch.ops.ava.qkv_rope.default, (qkv, cos, sin, 3))


@cuda
def test_torch_compile():
    built()
    qkv, cos, sin = inputs(2, 17, 4, 64, torch.bfloat16)

    def fn(qkv):
        q, k, v = qkv_rope(qkv, cos, sin, 4)
        return (q.float() * 2 + k.float() - v.float()).sum()

    eager_loss = fn(qkv)
    compiled_loss = torch.compile(fn, fullgraph=True)(qkv)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(torch.autograd.grad(compiled_loss, qkv), torch.autograd.grad(eager_loss, qkv))
