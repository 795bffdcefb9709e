"""Attention's qkv split + RoPE as one kernel each way (rope.cu): reads the packed qkv once and
writes q, k, v contiguous in (B, H, T, D), q and k rotated, where eager PyTorch makes separate
float-cast, chunk, multiply, cat, cast and permute-copy passes. The backward applies the inverse
rotation and packs the grads back into dqkv."""

import torch

import kernels


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
    if kernels.use_cuda(qkv, cos, sin) and cos.dim() == 2:  # per-row (B, 1, T, D/2): the twin
        return torch.ops.ava.qkv_rope(qkv, cos, sin, n_head)
    return qkv_rope_ref(qkv, cos, sin, n_head)


def _empty_heads(qkv, n_head):
    """Three uninitialised (B, H, T, D) tensors like qkv (B, T, 3C)."""
    B, T, C3 = qkv.shape
    return tuple(qkv.new_empty(B, n_head, T, C3 // (3 * n_head)) for _ in range(3))


@torch.library.custom_op('ava::qkv_rope', mutates_args=())
def _qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q, k, v, each (B, H, T, D) contiguous in qkv's dtype."""
    q, k, v = _empty_heads(qkv, n_head)
    torch.ops.ava_cuda.qkv_rope_fwd(qkv.contiguous(), cos.float().contiguous(),
                                    sin.float().contiguous(), q, k, v)
    return q, k, v


@_qkv_rope.register_fake
def _(qkv, cos, sin, n_head):
    return _empty_heads(qkv, n_head)


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
