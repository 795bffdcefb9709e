"""MoE permute (token rows -> expert-sorted rows) and unpermute + combine (expert rows -> each
token's gate-weighted sum) as one gather kernel each way (moe_permute.cu), where eager PyTorch
indexes, casts, multiplies by the gates and index_adds (with atomics) in separate passes.

The layout comes from the argsort by expert, as two int32 maps that invert each other where both
are >= 0 (M = N*K rows, assignment a = t*K + k):
    row_src (M,)           the assignment held by row r, or -1 for an unused row (a dropped one)
    assignment_row (N, K)  the row that assignment (t, k) occupies, or -1 if it was dropped
moe_sort builds them (and each expert's end row, offsets) in two launches."""

import torch

import ava_kernels


def moe_sort_ref(expert_idx, keep, n_experts):
    """The expert-sorted rows of the M = N*K assignments (t, k) of expert_idx (N, K) int64;
    dropped ones (keep False) get the sentinel expert E and sort last, outside every block; within
    an expert, assignments keep their order. -> offsets (E,), each expert's end row; row_src (M,);
    assignment_row (N, K); all int32, computed without a host sync, so the CPU can queue the next
    layers meanwhile."""
    (N, K), E = expert_idx.shape, n_experts
    flat_expert = torch.where(keep, expert_idx, E).flatten()              # (M,)
    order = flat_expert.argsort(stable=True)                               # (M,) assignment per row
    counts = torch.zeros(E + 1, dtype=torch.long, device=expert_idx.device).scatter_add_(
        0, flat_expert, torch.ones_like(flat_expert))                      # (E+1,) dropped last
    offsets = counts[:E].cumsum(0).to(torch.int32)                         # (E,)
    rows = torch.arange(N * K, device=expert_idx.device)
    row_src = torch.where(rows < offsets[-1], order, -1).int()             # (M,)
    assignment_row = torch.empty_like(order).scatter_(0, order, rows)      # (M,) inverse of order
    return offsets, row_src, torch.where(keep.flatten(), assignment_row, -1).int().view(N, K)


def moe_sort(expert_idx, keep, n_experts):
    """moe_sort_ref's function through the CUDA kernels when they are available (E <= 256)."""
    if ava_kernels.use_cuda(expert_idx, keep) and n_experts <= 256:
        return torch.ops.ava.moe_sort(expert_idx, keep, n_experts)
    return moe_sort_ref(expert_idx, keep, n_experts)


def moe_permute_ref(x, row_src, assignment_row):
    """x (N, C) -> xs (M, C): xs[r] = x[row_src[r] // K], zeros in unused rows; in the autocast
    dtype (else x's)."""
    K = assignment_row.size(1)
    used = row_src >= 0                                                   # (M,)
    compute = torch.promote_types(x.dtype, torch.float32)
    picked = x.to(compute)[torch.where(used, row_src, 0) // K]            # (M, C) row 0 for unused
    return torch.where(used[:, None], picked, 0).to(ava_kernels.autocast_dtype(x))


def moe_unpermute_ref(ys, gates, row_src, assignment_row):
    """ys (M, C) expert outputs, gates (N, K) -> out (N, C) in gates' dtype: out[t] = sum over t's
    kept assignments k of gates[t, k] * ys[assignment_row[t, k]]. Rows of ys that no assignment
    points to may hold garbage (even NaN): masked out before any arithmetic, so they reach neither
    out nor the gradients."""
    kept = assignment_row >= 0                                            # (N, K)
    compute = torch.promote_types(torch.promote_types(ys.dtype, gates.dtype), torch.float32)
    picked = ys.to(compute)[torch.where(kept, assignment_row, 0)]         # (N, K, C) 0 if dropped
    weighted = torch.where(kept[..., None], picked, 0) * gates.to(compute)[..., None]
    return weighted.sum(1).to(gates.dtype)


def moe_permute(x, row_src, assignment_row):
    """moe_permute_ref's function through the CUDA kernels when they are available."""
    if ava_kernels.use_cuda(x, row_src, assignment_row):
        return torch.ops.ava.moe_permute(x, row_src, assignment_row, ava_kernels.autocast_dtype(x))
    return moe_permute_ref(x, row_src, assignment_row)


def moe_unpermute(ys, gates, row_src, assignment_row):
    """moe_unpermute_ref's function through the CUDA kernels when they are available."""
    if ava_kernels.use_cuda(ys, gates, row_src, assignment_row):
        return torch.ops.ava.moe_unpermute(ys, gates, row_src, assignment_row)
    return moe_unpermute_ref(ys, gates, row_src, assignment_row)


@torch.library.custom_op('ava::moe_sort', mutates_args=())
def _moe_sort(expert_idx: torch.Tensor, keep: torch.Tensor,
              n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> offsets (E,), row_src (M,), assignment_row (N, K), int32. Indices: no autograd."""
    offsets = expert_idx.new_empty(n_experts, dtype=torch.int32)
    row_src = expert_idx.new_empty(expert_idx.numel(), dtype=torch.int32)
    assignment_row = expert_idx.new_empty(expert_idx.shape, dtype=torch.int32)
    torch.ops.ava_cuda.moe_sort(expert_idx.contiguous(), keep.contiguous(), offsets, row_src,
                                assignment_row)
    return offsets, row_src, assignment_row


@_moe_sort.register_fake
def _(expert_idx, keep, n_experts):
    return (expert_idx.new_empty(n_experts, dtype=torch.int32),
            expert_idx.new_empty(expert_idx.numel(), dtype=torch.int32),
            expert_idx.new_empty(expert_idx.shape, dtype=torch.int32))


@torch.library.custom_op('ava::moe_permute', mutates_args=())
def _moe_permute(x: torch.Tensor, row_src: torch.Tensor, assignment_row: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """-> xs (M, C) in out_dtype."""
    xs = x.new_empty(row_src.size(0), x.size(1), dtype=out_dtype)
    torch.ops.ava_cuda.moe_permute_fwd(x.contiguous(), row_src.contiguous(), assignment_row.size(1),
                                       xs)
    return xs


@_moe_permute.register_fake
def _(x, row_src, assignment_row, out_dtype):
    return x.new_empty(row_src.size(0), x.size(1), dtype=out_dtype)


@torch.library.custom_op('ava::moe_permute_backward', mutates_args=())
def _moe_permute_backward(dxs: torch.Tensor, assignment_row: torch.Tensor,
                          x_dtype: torch.dtype) -> torch.Tensor:
    """dxs (M, C) -> dx (N, C) in x_dtype: dx[t] = sum of dxs over t's kept rows (a gather-sum, no
    atomics)."""
    dx = dxs.new_empty(assignment_row.size(0), dxs.size(1), dtype=x_dtype)
    torch.ops.ava_cuda.moe_permute_bwd(dxs.contiguous(), assignment_row.contiguous(), dx)
    return dx


@_moe_permute_backward.register_fake
def _(dxs, assignment_row, x_dtype):
    return dxs.new_empty(assignment_row.size(0), dxs.size(1), dtype=x_dtype)


def _permute_setup_context(ctx, inputs, output):
    x, _, assignment_row, _ = inputs
    ctx.save_for_backward(assignment_row)
    ctx.x_dtype = x.dtype


def _permute_backward(ctx, dxs):
    assignment_row, = ctx.saved_tensors
    return torch.ops.ava.moe_permute_backward(dxs, assignment_row, ctx.x_dtype), None, None, None


_moe_permute.register_autograd(_permute_backward, setup_context=_permute_setup_context)


@torch.library.custom_op('ava::moe_unpermute', mutates_args=())
def _moe_unpermute(ys: torch.Tensor, gates: torch.Tensor, row_src: torch.Tensor,
                   assignment_row: torch.Tensor) -> torch.Tensor:
    """-> out (N, C) in gates' dtype. (row_src is for backward.)"""
    out = gates.new_empty(gates.size(0), ys.size(1))
    torch.ops.ava_cuda.moe_unpermute_fwd(ys.contiguous(), gates.float().contiguous(),
                                         assignment_row.contiguous(), out)
    return out


@_moe_unpermute.register_fake
def _(ys, gates, row_src, assignment_row):
    return gates.new_empty(gates.size(0), ys.size(1))


@torch.library.custom_op('ava::moe_unpermute_backward', mutates_args=())
def _moe_unpermute_backward(dout: torch.Tensor, ys: torch.Tensor, gates: torch.Tensor,
                            row_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dys (M, C) in ys's dtype, dgates (N, K) fp32, in one pass over the rows (dgates of a
    dropped assignment, which owns no row, stays 0)."""
    dys = ys.new_empty(ys.shape)
    dgates = torch.zeros(gates.shape, dtype=torch.float32, device=gates.device)
    torch.ops.ava_cuda.moe_unpermute_bwd(dout.contiguous(), ys.contiguous(),
                                         gates.float().contiguous(), row_src.contiguous(), dys,
                                         dgates)
    return dys, dgates


@_moe_unpermute_backward.register_fake
def _(dout, ys, gates, row_src):
    return ys.new_empty(ys.shape), gates.new_empty(gates.shape, dtype=torch.float32)


def _unpermute_setup_context(ctx, inputs, output):
    ys, gates, row_src, _ = inputs
    ctx.save_for_backward(ys, gates, row_src)


def _unpermute_backward(ctx, dout):
    ys, gates, row_src = ctx.saved_tensors
    dys, dgates = torch.ops.ava.moe_unpermute_backward(dout, ys, gates, row_src)
    return dys, dgates.to(gates.dtype), None, None


_moe_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup_context)
