"""RMSNorm as one kernel each way (rms_norm.cu): reads the fp32 residual once and writes the
normalised rows straight in the next matmul's dtype, where eager PyTorch makes separate square,
mean, rsqrt, multiply and cast passes."""

import torch

import ava_kernels


def rms_norm_ref(x, weight, eps):
    """x (..., C) / sqrt(mean(x^2) + eps) * weight (C,), computed in fp32, returned in the autocast
    dtype (else x's dtype)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(ava_kernels.autocast_dtype(x))


def rms_norm(x, weight, eps):
    """rms_norm_ref's function through the CUDA kernels when they are available."""
    if ava_kernels.use_cuda(x, weight):
        return torch.ops.ava.rms_norm(x, weight, eps, ava_kernels.autocast_dtype(x))[0]
    return rms_norm_ref(x, weight, eps)


@torch.library.custom_op('ava::rms_norm', mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> y (..., C) in out_dtype, rstd (N,) fp32 for backward."""
    rows = x.reshape(-1, x.size(-1)).contiguous()  # (N, C)
    y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows.size(0), dtype=torch.float32, device=x.device)
    torch.ops.ava_cuda.rms_norm_fwd(rows, weight.contiguous(), y, rstd, eps)
    return y.view(x.shape), rstd


@_rms_norm.register_fake
def _(x, weight, eps, out_dtype):
    rows = x.numel() // x.size(-1)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op('ava::rms_norm_backward', mutates_args=())
def _rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx like x, dweight (C,) fp32."""
    rows = x.reshape(-1, x.size(-1)).contiguous()                          # (N, C)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    blocks = max(1, min(4 * sms, (rows.size(0) + 7) // 8))
    dx = torch.empty_like(rows)
    dw_partial = rows.new_empty(blocks, rows.size(1), dtype=torch.float32)  # (blocks, C)
    torch.ops.ava_cuda.rms_norm_bwd(dy.reshape(rows.shape).contiguous(), rows,
                                    weight.float().contiguous(), rstd, dx, dw_partial)
    return dx.view(x.shape), dw_partial.sum(0)


@_rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = torch.ops.ava.rms_norm_backward(dy, x, weight, rstd)
    return dx, dweight.to(weight.dtype), None, None


_rms_norm.register_autograd(_backward, setup_context=_setup_context)
