"""qkv split + RoPE: the PyTorch twin against complex-number rotation in float64 (CPU), and the CUDA
kernels against the twin in float64 (GPU only). The decode op norm_qkv_rope (RMSNorm + qkv matmul +
RoPE): its twin and its kernel against a float64 normalise, matmul and complex rotation."""

import pytest
import torch

from kernel_utils import built, cuda, poison, rel_err
from ava_kernels.rope import MAX_TOKENS, norm_qkv_rope, norm_qkv_rope_ref, qkv_rope, qkv_rope_ref


def angles(T, D, start=0, device='cpu'):
    """theta (T, D/2) float64: position * 10000^(-2j/D), positions start .. start+T-1."""
    pos = torch.arange(start, start + T, dtype=torch.float64, device=device)
    return pos[:, None] * 10000.0 ** (-2 * torch.arange(D // 2, dtype=torch.float64,
                                                        device=device) / D)


def complex_rotate(x, theta):
    """x (..., T, D) as pairs x1 + i x2 (x1 the first D/2 channels) times e^{i theta},
    theta (T, D/2)."""
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
    # backward of a rotation is the inverse rotation e^{-i theta} (dx1 = dq1 cos + dq2 sin, ...);
    # dv is copied
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
    """qkv (B, T, 3HD) requiring grad (starting one element past a 16-byte boundary if misaligned,
    which forces the scalar path), and fp32 cos, sin tables for positions 7 .. 7+T-1."""
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
    # non-contiguous dq: no layout assumed
    grads[0] = grads[0].transpose(1, 2).contiguous().transpose(1, 2)
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
    torch.testing.assert_close(torch.autograd.grad(compiled_loss, qkv),
                               torch.autograd.grad(eager_loss, qkv))


# --- norm_qkv_rope: RMSNorm, the qkv projection and RoPE of a decode step ---


def norm_qkv_rope_float64(x, norm_w, eps, w_qkv, theta, H):
    """The op by hand in float64: normalise, matmul, split into heads by indexing, rotate q and k as
    complex numbers by theta (T, D/2) or (B, 1, T, D/2)."""
    x, norm_w, w_qkv = x.double(), norm_w.double(), w_qkv.double()
    xn = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * norm_w
    q, k, v = heads(xn @ w_qkv.t(), H)
    return complex_rotate(q, theta), complex_rotate(k, theta), v


def make_decode(B, T, C, H, dtype=torch.float32, weight_dtype=torch.float32, device='cpu', offset=0,
                start=7):
    """x (B, T, C) at a residual stream's scale, starting offset elements past a 16-byte boundary;
    norm_w (C,) around 1 and w_qkv (3C, C) ~N(0, 1/C) in weight_dtype; cos, sin (T, D/2) fp32 for
    positions start ..; theta."""
    gen = torch.Generator().manual_seed(B * 1000 + T * 100 + C)
    # offset on the device
    flat = (3 * torch.randn(B * T * C + offset, generator=gen)).to(device, dtype)
    norm_w = 1 + 0.2 * torch.randn(C, generator=gen)
    w_qkv = torch.randn(3 * C, C, generator=gen) / C ** 0.5
    theta = angles(T, C // H, start, device)
    return (flat[offset:].view(B, T, C), norm_w.to(device, weight_dtype),
            w_qkv.to(device, weight_dtype), theta.cos().float(), theta.sin().float(), theta)


@pytest.mark.parametrize('B,T,C,H', [(1, 1, 8, 1), (2, 5, 12, 2), (3, 2, 32, 4)])
def test_norm_qkv_rope_ref_matches_float64(B, T, C, H):
    x, norm_w, w_qkv, _, _, theta = make_decode(B, T, C, H, torch.float64, torch.float64)
    out = norm_qkv_rope_ref(x, norm_w, 1e-6, w_qkv, theta.cos(), theta.sin(), H)
    for o, r in zip(out, norm_qkv_rope_float64(x, norm_w, 1e-6, w_qkv, theta, H)):
        assert o.shape == (B, H, T, C // H) and o.is_contiguous() and o.dtype == torch.float64
        assert rel_err(o, r) < 1e-6  # rms_norm_ref normalises in fp32


def test_norm_qkv_rope_ref_per_row_tables():
    """Left-padded rows: each row its own positions, tables (B, 1, T, D/2)."""
    B, T, C, H = 3, 4, 16, 2
    x, norm_w, w_qkv, _, _, _ = make_decode(B, T, C, H, torch.float64, torch.float64)
    # (B, 1, T, D/2)
    theta = torch.stack([angles(T, C // H, start) for start in (0, 5, 11)])[:, None]
    out = norm_qkv_rope_ref(x, norm_w, 1e-6, w_qkv, theta.cos(), theta.sin(), H)
    for o, r in zip(out, norm_qkv_rope_float64(x, norm_w, 1e-6, w_qkv, theta, H)):
        assert rel_err(o, r) < 1e-6


@pytest.mark.parametrize('dtype,weight_dtype,tol', [(torch.bfloat16, torch.bfloat16, 1e-2),
                                                    (torch.float32, torch.bfloat16, 1e-5),
                                                    (torch.bfloat16, torch.float32, 1e-2)])
def test_norm_qkv_rope_ref_dtypes(dtype, weight_dtype, tol):
    """Out in x's dtype outside autocast, whatever the weights' (the twin casts w_qkv to the normed
    x's)."""
    x, norm_w, w_qkv, cos, sin, theta = make_decode(2, 3, 32, 4, dtype, weight_dtype)
    out = norm_qkv_rope_ref(x, norm_w, 1e-6, w_qkv, cos, sin, 4)
    for o, r in zip(out, norm_qkv_rope_float64(x, norm_w, 1e-6, w_qkv, theta, 4)):
        assert o.dtype == dtype and o.shape == (2, 4, 3, 8)
        assert rel_err(o, r) < tol


# --- the norm_qkv_rope kernel against the float64 computation ---


DECODE_DTYPES = [  # x, norm_w and w_qkv, autocast, tolerance
    (torch.float32, torch.float32, False, 1e-5),
    (torch.bfloat16, torch.bfloat16, False, 1e-2),
    (torch.float32, torch.bfloat16, False, 1e-5),   # bf16 weights are exact inputs: an fp32 result
    (torch.bfloat16, torch.float32, False, 1e-2),   # norm_w read in x's dtype (cast)
    (torch.float32, torch.float32, True, 1e-2),     # a trained checkpoint under autocast: bf16 out
]


@cuda
@pytest.mark.parametrize('dtype,weight_dtype,autocast,tol', DECODE_DTYPES)
@pytest.mark.parametrize('B,T,C,H,offset', [
    (1, 1, 512, 8, 0),   # a decode step of config/small.py
    (32, 1, 512, 8, 0),  # batch 32: 4 tiles of 8 tokens
    (1, 3, 512, 8, 0),   # a speculative step
    (8, 8, 256, 4, 0),   # the limit: 64 tokens
    (2, 5, 18, 3, 0),    # odd sizes: the scalar path, a pair left over, a warp across q and k
    (3, 1, 40, 4, 1),    # x off a 16-byte boundary: the scalar path
    (0, 1, 64, 4, 0),    # no tokens
    (2, 0, 64, 4, 0),
])
def test_cuda_norm_qkv_rope_matches_float64(B, T, C, H, offset, dtype, weight_dtype, autocast, tol):
    built()
    x, norm_w, w_qkv, cos, sin, theta = make_decode(B, T, C, H, dtype, weight_dtype, 'cuda', offset)
    ref = norm_qkv_rope_float64(x, norm_w, 1e-6, w_qkv, theta, H)
    poison()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        out = norm_qkv_rope(x, norm_w, 1e-6, w_qkv, cos, sin, H)
    for o, r in zip(out, ref):
        assert o.shape == (B, H, T, C // H) and o.is_contiguous()
        assert o.dtype == (torch.bfloat16 if autocast else dtype)
        if r.numel():
            assert rel_err(o, r) < tol


@cuda
def test_cuda_norm_qkv_rope_falls_back_to_the_twin():
    """Per-row tables and more than MAX_TOKENS tokens take the twin: its very result."""
    built()
    x, norm_w, w_qkv, _, _, _ = make_decode(3, 4, 64, 4, device='cuda')
    # (B, 1, T, D/2)
    theta = torch.stack([angles(4, 16, start, 'cuda') for start in (0, 5, 11)])[:, None]
    args = (x, norm_w, 1e-6, w_qkv, theta.cos().float(), theta.sin().float(), 4)
    assert all(torch.equal(o, r) for o, r in zip(norm_qkv_rope(*args), norm_qkv_rope_ref(*args)))
    x, norm_w, w_qkv, cos, sin, _ = make_decode(MAX_TOKENS + 1, 1, 64, 4, device='cuda')
    args = (x, norm_w, 1e-6, w_qkv, cos, sin, 4)
    assert all(torch.equal(o, r) for o, r in zip(norm_qkv_rope(*args), norm_qkv_rope_ref(*args)))


@cuda
def test_cuda_norm_qkv_rope_opcheck_compile_and_graph():
    built()
    x, norm_w, w_qkv, cos, sin, _ = make_decode(6, 1, 64, 4, torch.bfloat16, torch.bfloat16, 'cuda')
    for out_dtype in (torch.bfloat16, torch.float32):
        torch.library.opcheck(torch.ops.ava.norm_qkv_rope.default,
                              (x, norm_w, 1e-6, w_qkv, cos, sin, 4, out_dtype))
    op = lambda x: norm_qkv_rope(x, norm_w, 1e-6, w_qkv, cos, sin, 4)  # noqa: E731
    eager = op(x)
    compiled = torch.compile(op, fullgraph=True)(x)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
    graph, captured_x = torch.cuda.CUDAGraph(), x.clone()
    op(captured_x)  # warm-up off the graph
    with torch.cuda.graph(graph):
        captured = op(captured_x)
    new_x = torch.randn_like(x)
    captured_x.copy_(new_x)
    graph.replay()
    assert all(torch.equal(c, e) for c, e in zip(captured, op(new_x)))
