"""The MoE layer for a few tokens at inference (moe_decode.cu): routing, the K experts of each
token and the gate-weighted sum in four launches, where the training path (sort, permute, grouped
GEMMs, unpermute) makes ~17 launches that each move a few kilobytes when N is a decode step's."""

import torch
import torch.nn.functional as F

import kernels

MAX_ASSIGNMENTS = 64  # N * K; moe_decode.cu's limit, and the size below which launches dominate
MAX_EXPERTS = 64      # moe_decode.cu's kMaxExperts


def moe_decode_ref(x, router_w, bias, w_in, w_out, top_k, act):
    """x (N, C) -> out (N, C) in router_w's dtype (the residual stream's): Router at inference
    (top-k of x router_w^T + bias in fp32, gates softmax over the chosen logits), then each token's
    experts, w_in (E, I, C) and w_out (E, C, F) as MoE stores them, act 'gelu' or 'swiglu'. The
    twin runs every expert on every token and zeroes the gates of the unchosen: no gather, no sort,
    and cheap at this N."""
    with torch.autocast(x.device.type, enabled=False):  # fp32 throughout, as the kernels
        xf = x.float()
        logits = xf @ router_w.float().t()                                # (N, E)
        chosen = (logits if bias is None else logits + bias.float()).topk(top_k, dim=-1).indices
        gates = logits.gather(1, chosen).softmax(dim=-1)                  # (N, K)
        dense_gates = torch.zeros_like(logits).scatter(1, chosen, gates)  # (N, E)
        h = torch.einsum('nc,eic->nei', xf, w_in.float())                 # (N, E, I)
        if act == 'swiglu':
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)                                                 # (N, E, F)
        y = torch.einsum('nef,ecf->nec', h, w_out.float())                # (N, E, C)
        return torch.einsum('nec,ne->nc', y, dense_gates).to(router_w.dtype)


def moe_decode(x, router_w, bias, w_in, w_out, top_k, act):
    """moe_decode_ref's function through the CUDA kernels when they are available."""
    fits = x.size(0) * top_k <= MAX_ASSIGNMENTS and w_in.size(0) <= MAX_EXPERTS
    if fits and kernels.use_cuda(x, router_w, w_in, w_out):
        return torch.ops.ava.moe_decode(x, router_w, bias, w_in, w_out, top_k, act == 'swiglu')
    return moe_decode_ref(x, router_w, bias, w_in, w_out, top_k, act)


@torch.library.custom_op('ava::moe_decode', mutates_args=())
def _moe_decode(x: torch.Tensor, router_w: torch.Tensor, bias: torch.Tensor | None,
                w_in: torch.Tensor, w_out: torch.Tensor, top_k: int,
                swiglu: bool) -> torch.Tensor:
    """-> out (N, C) in router_w's dtype. Inference only: no autograd."""
    out = x.new_empty(x.shape, dtype=router_w.dtype)
    torch.ops.ava_cuda.moe_decode(x.contiguous(), router_w.contiguous(), bias, w_in.contiguous(),
                                  w_out.contiguous(), top_k, swiglu, out)
    return out


@_moe_decode.register_fake
def _(x, router_w, bias, w_in, w_out, top_k, swiglu):
    return x.new_empty(x.shape, dtype=router_w.dtype)
