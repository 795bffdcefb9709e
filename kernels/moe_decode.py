"""The second half of a block for a few tokens at inference (moe_decode.cu): the attention's
residual add, the norm, routing, the K experts of each token, the gate-weighted sum and the MoE's
residual add in four launches, where the unfused path (add, norm, sort, permute, grouped GEMMs,
unpermute, add) makes ~20 launches that each move a few kilobytes when N is a decode step's."""

import torch
import torch.nn.functional as F

import ava_kernels
from ava_kernels.rms_norm import rms_norm_ref

MAX_ASSIGNMENTS = 64  # N * K; moe_decode.cu's limit, and the size below which launches dominate
MAX_EXPERTS = 64      # moe_decode.cu's kMaxExperts


def moe_decode_ref(x, attn, norm_w, eps, router_w, bias, w_in, w_out, top_k, act):
    """x (N, C) the residual stream, attn (N, C) the attention's output -> out (N, C) in x's dtype:
    r = x + attn, then r + the MoE layer of rms_norm(r) * norm_w: Router at inference (top-k of
    logits + bias in fp32, gates softmax over the chosen logits), each token's experts, w_in
    (E, I, C) and w_out (E, C, F) as MoE stores them, act 'gelu' or 'swiglu'. The roundings are the
    unfused block's. The twin runs every expert on every token and zeroes the gates of the
    unchosen: no gather, no sort, and cheap at this N."""
    r = x + attn.to(x.dtype)                                              # (N, C)
    xn = rms_norm_ref(r, norm_w, eps)                                     # (N, C) matmul dtype
    with torch.autocast(x.device.type, enabled=False):  # fp32 throughout, as the kernels
        xf = xn.float()
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
        h = h.to(xn.dtype).float()                                        # as the grouped path
        y = torch.einsum('nef,ecf->nec', h, w_out.float())                # (N, E, C)
        return r + torch.einsum('nec,ne->nc', y, dense_gates).to(x.dtype)


def moe_decode(x, attn, norm_w, eps, router_w, bias, w_in, w_out, top_k, act):
    """moe_decode_ref's function through the CUDA kernels when they are available."""
    fits = x.size(0) * top_k <= MAX_ASSIGNMENTS and w_in.size(0) <= MAX_EXPERTS
    if fits and ava_kernels.use_cuda(x, attn, norm_w, router_w, w_in, w_out):
        return torch.ops.ava.moe_decode(x, attn.to(x.dtype), norm_w.to(router_w.dtype), eps,
                                        router_w, bias, w_in, w_out, top_k, act == 'swiglu',
                                        ava_kernels.autocast_dtype(x))
    return moe_decode_ref(x, attn, norm_w, eps, router_w, bias, w_in, w_out, top_k, act)


@torch.library.custom_op('ava::moe_decode', mutates_args=())
def _moe_decode(x: torch.Tensor, attn: torch.Tensor, norm_w: torch.Tensor, eps: float,
                router_w: torch.Tensor, bias: torch.Tensor | None, w_in: torch.Tensor,
                w_out: torch.Tensor, top_k: int, swiglu: bool,
                dtype: torch.dtype) -> torch.Tensor:
    """-> out (N, C) in x's dtype; dtype is the matmuls' (the normed rows and the hidden layer).
    Inference only: no autograd."""
    out = torch.empty_like(x)
    torch.ops.ava_cuda.moe_decode(x.contiguous(), attn.contiguous(), norm_w.contiguous(), eps,
                                  router_w.contiguous(), bias, w_in.contiguous(),
                                  w_out.contiguous(), top_k, swiglu, dtype, out)
    return out


@_moe_decode.register_fake
def _(x, attn, norm_w, eps, router_w, bias, w_in, w_out, top_k, swiglu, dtype):
    return torch.empty_like(x)
