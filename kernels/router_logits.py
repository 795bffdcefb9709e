"""The router's logits (router_logits.cu): x . w^T in fp32 straight from the bf16 activations,
where eager PyTorch writes an fp32 copy of them first, and in backward an fp32 gradient it then
casts: an (N, E) result for ~6 passes over (N, C)."""

import torch
import torch.nn.functional as F

import kernels


def router_logits_ref(x, weight):
    """x (N, C) . weight (E, C)^T -> logits (N, E) in fp32 whatever autocast says: which experts a
    token goes to turns on small differences between logits."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def router_logits(x, weight):
    """router_logits_ref's function through the CUDA kernels when they are available."""
    if kernels.use_cuda(x, weight) and x.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.ava.router_logits(x, weight.float())
    return router_logits_ref(x, weight)


@torch.library.custom_op('ava::router_logits', mutates_args=())
def _router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, C) fp32 or bf16, weight (E, C) fp32 -> logits (N, E) fp32."""
    logits = x.new_empty(x.size(0), weight.size(0), dtype=torch.float32)
    torch.ops.ava_cuda.router_logits_fwd(x.contiguous(), weight.contiguous(), logits)
    return logits


@_router_logits.register_fake
def _(x, weight):
    return x.new_empty(x.size(0), weight.size(0), dtype=torch.float32)


@torch.library.custom_op('ava::router_logits_backward', mutates_args=())
def _router_logits_backward(dlogits: torch.Tensor, x: torch.Tensor,
                            weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx like x, dweight (E, C) fp32."""
    x = x.contiguous()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    blocks = max(1, min(2 * sms, x.size(0)))
    dx = torch.empty_like(x)
    dw_partial = x.new_empty(blocks, *weight.shape, dtype=torch.float32)  # (blocks, E, C)
    torch.ops.ava_cuda.router_logits_bwd(dlogits.float().contiguous(), x, weight.contiguous(),
                                         dx, dw_partial)
    return dx, dw_partial.sum(0)


@_router_logits_backward.register_fake
def _(dlogits, x, weight):
    return torch.empty_like(x), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dlogits):
    x, weight = ctx.saved_tensors
    return torch.ops.ava.router_logits_backward(dlogits, x, weight)


_router_logits.register_autograd(_backward, setup_context=_setup_context)
