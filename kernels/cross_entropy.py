"""Next-token cross-entropy as one kernel each way (cross_entropy.cu): the forward reads the
(bf16) logits once and keeps only each row's loss and logsumexp; the backward reads them once more
and writes dlogits. Eager PyTorch's F.cross_entropy(logits.float(), ...) makes several fp32 copies
of the (N, V) logits (4 GB each at N = V = 32768).

A target of -1 marks a row to ignore (no loss, no gradient)."""

import torch
import torch.nn.functional as F

import ava_kernels


def cross_entropy_ref(logits, targets):
    """Mean next-token loss over the targets that are not -1; logits (N, V) any float dtype,
    computed in (at least) fp32; targets (N,) int64. Returns a 0-dim tensor (nan when every target
    is ignored, like PyTorch's mean)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(compute), targets, ignore_index=-1)


def cross_entropy(logits, targets):
    """cross_entropy_ref's function through the CUDA kernels when they are available (fp32 or bf16
    logits)."""
    if logits.dtype in (torch.float32, torch.bfloat16) and ava_kernels.use_cuda(logits, targets):
        loss_rows, _ = torch.ops.ava.cross_entropy_rows(logits, targets)
        return loss_rows.sum() / (targets != -1).sum()
    return cross_entropy_ref(logits, targets)


@torch.library.custom_op('ava::cross_entropy_rows', mutates_args=())
def _cross_entropy_rows(logits: torch.Tensor,
                        targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), targets (N,) -> loss_rows (N,) fp32 (0 where the target is -1; NaN where it is
    out of range), lse (N,) fp32 logsumexp of each row, kept for backward."""
    loss_rows = logits.new_empty(logits.size(0), dtype=torch.float32)
    lse = torch.empty_like(loss_rows)
    torch.ops.ava_cuda.cross_entropy_fwd(logits.contiguous(), targets.contiguous(), loss_rows, lse)
    return loss_rows, lse


@_cross_entropy_rows.register_fake
def _(logits, targets):
    return tuple(logits.new_empty(logits.size(0), dtype=torch.float32) for _ in range(2))


@torch.library.custom_op('ava::cross_entropy_rows_backward', mutates_args=())
def _cross_entropy_rows_backward(dloss_rows: torch.Tensor, logits: torch.Tensor,
                                 targets: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """-> dlogits (N, V) in logits' dtype: dloss_rows[i] * (softmax(logits[i]) -
    onehot(targets[i])), 0 in ignored rows. dloss_rows arrives as a stride-0 expand from the mean's
    sum; contiguous() makes it real."""
    dlogits = logits.new_empty(logits.shape)
    torch.ops.ava_cuda.cross_entropy_bwd(dloss_rows.contiguous(), logits.contiguous(),
                                         targets.contiguous(), lse.contiguous(), dlogits)
    return dlogits


@_cross_entropy_rows_backward.register_fake
def _(dloss_rows, logits, targets, lse):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, targets = inputs
    ctx.save_for_backward(logits, targets, output[1])


def _backward(ctx, dloss_rows, _):
    logits, targets, lse = ctx.saved_tensors
    return torch.ops.ava.cross_entropy_rows_backward(dloss_rows, logits, targets, lse), None


_cross_entropy_rows.register_autograd(_backward, setup_context=_setup_context)
