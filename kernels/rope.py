"""Attention's qkv split + RoPE as one kernel each way (rope.cu): reads the packed qkv once and
writes q, k, v contiguous in (B, H, T, D), q and k rotated, where eager PyTorch makes separate
float-cast, chunk, multiply, cat, cast and permute-copy passes. The backward applies the inverse
rotation and packs the grads back into dqkv.
For a decode step, norm_qkv_rope does the attention's whole input side (RMSNorm, the qkv matmul,
the split and RoPE) in one launch, where the unfused path makes three that each wait on the last."""

import torch
import torch.nn.functional as F

import ava_kernels
from ava_kernels.rms_norm import rms_norm_ref

MAX_TOKENS = 64  # B*T; rope.cu's kMaxTokens: a decode or speculative step. The kernel re-reads
                 # its weight rows per 8 tokens; longer steps take cuBLAS's tiled GEMM


def _rotate(x, cos, sin):
    """Rotate each channel pair (x1, x2) by its position's angle; x (B, H, T, D), cos and sin
    (T, D/2)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(compute).chunk(2, dim=-1)  # (B, H, T, D/2) each: 'half-split' pairs
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def qkv_rope_ref(qkv, cos, sin, n_head):
    """qkv (B, T, 3C) -> q, k, v, each (B, H, T, D) in qkv's dtype, q and k rotated by RoPE in (at
    least) fp32. cos, sin (T, D/2) hold the angles of these T positions, or (B, 1, T, D/2) per row
    (left-padded batches). v is returned as a (non-contiguous) view of qkv."""
    B, T, C3 = qkv.shape
    heads = qkv.view(B, T, 3, n_head, C3 // (3 * n_head))
    q, k, v = heads.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def qkv_rope(qkv, cos, sin, n_head):
    """qkv_rope_ref's function through the CUDA kernels when they are available (q, k, v then
    contiguous)."""
    if ava_kernels.use_cuda(qkv, cos, sin) and cos.dim() == 2:  # per-row (B, 1, T, D/2): the twin
        return torch.ops.ava.qkv_rope(qkv, cos, sin, n_head)
    return qkv_rope_ref(qkv, cos, sin, n_head)


def _empty_heads(like, n_head, head_dim, dtype):
    """Three uninitialised (B, H, T, D) tensors on like's (B, T, ...) device."""
    B, T = like.shape[:2]
    return tuple(like.new_empty(B, n_head, T, head_dim, dtype=dtype) for _ in range(3))


@torch.library.custom_op('ava::qkv_rope', mutates_args=())
def _qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q, k, v, each (B, H, T, D) contiguous in qkv's dtype."""
    q, k, v = _empty_heads(qkv, n_head, qkv.size(2) // (3 * n_head), qkv.dtype)
    torch.ops.ava_cuda.qkv_rope_fwd(qkv.contiguous(), cos.float().contiguous(),
                                    sin.float().contiguous(), q, k, v)
    return q, k, v


@_qkv_rope.register_fake
def _(qkv, cos, sin, n_head):
    return _empty_heads(qkv, n_head, qkv.size(2) // (3 * n_head), qkv.dtype)


@torch.library.custom_op('ava::qkv_rope_backward', mutates_args=())
def _qkv_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    """dq, dk, dv (B, H, T, D) -> dqkv (B, T, 3C): dq and dk rotated back by -angle, dv copied."""
    B, H, T, D = dq.shape
    dqkv = dq.new_empty(B, T, 3 * H * D)
    torch.ops.ava_cuda.qkv_rope_bwd(dq.contiguous(), dk.contiguous(), dv.contiguous(),
                                    cos.float().contiguous(), sin.float().contiguous(), dqkv)
    return dqkv


@_qkv_rope_backward.register_fake
def _(dq, dk, dv, cos, sin):
    B, H, T, D = dq.shape
    return dq.new_empty(B, T, 3 * H * D)


def _setup_context(ctx, inputs, output):
    _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    return torch.ops.ava.qkv_rope_backward(dq, dk, dv, cos, sin), None, None, None


_qkv_rope.register_autograd(_backward, setup_context=_setup_context)


def norm_qkv_rope_ref(x, norm_w, eps, w_qkv, cos, sin, n_head):
    """x (B, T, C) -> q, k, v, each (B, H, T, D) contiguous in the autocast dtype (else x's):
    rms_norm_ref(x, norm_w, eps), the qkv projection by w_qkv (3C, C) (rows [q; k; v], an
    nn.Linear's weight), then qkv_rope_ref with cos, sin (T, D/2) or per row (B, 1, T, D/2)."""
    xn = rms_norm_ref(x, norm_w, eps)                  # (B, T, C) in the next matmul's dtype
    qkv = F.linear(xn, w_qkv.to(xn.dtype))             # (B, T, 3C); autocast would cast w too
    return tuple(t.contiguous() for t in qkv_rope_ref(qkv, cos, sin, n_head))


def norm_qkv_rope(x, norm_w, eps, w_qkv, cos, sin, n_head):
    """norm_qkv_rope_ref's function through the CUDA kernel when it is available and the step is
    short (B*T <= 64 tokens), with one (T, D/2) table for all rows."""
    B, T, C = x.shape
    fits = B * T <= MAX_TOKENS and cos.dim() == 2 and C % n_head == 0 and (C // n_head) % 2 == 0
    if fits and ava_kernels.use_cuda(x, norm_w, w_qkv, cos, sin):
        return torch.ops.ava.norm_qkv_rope(x, norm_w, eps, w_qkv, cos, sin, n_head,
                                           ava_kernels.autocast_dtype(x))
    return norm_qkv_rope_ref(x, norm_w, eps, w_qkv, cos, sin, n_head)


@torch.library.custom_op('ava::norm_qkv_rope', mutates_args=())
def _norm_qkv_rope(x: torch.Tensor, norm_w: torch.Tensor, eps: float, w_qkv: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, n_head: int,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q, k, v, each (B, H, T, D) contiguous in out_dtype. Inference only: no autograd."""
    q, k, v = _empty_heads(x, n_head, x.size(2) // n_head, out_dtype)
    # the kernel reads norm_w in x's dtype: a model's own weights pass as they are, no cast
    norm_w = norm_w if norm_w.dtype == x.dtype else norm_w.to(x.dtype)
    torch.ops.ava_cuda.norm_qkv_rope(x.contiguous(), norm_w.contiguous(), w_qkv.contiguous(),
                                     cos.float().contiguous(), sin.float().contiguous(), eps, q,
                                     k, v)
    return q, k, v


@_norm_qkv_rope.register_fake
def _(x, norm_w, eps, w_qkv, cos, sin, n_head, out_dtype):
    return _empty_heads(x, n_head, x.size(2) // n_head, out_dtype)
