"""Attention of a few new tokens over the KV cache (cached_attention.cu): the cache write, the
masked softmax attention and the layout back to (B, T, C) in one launch, where index_copy, SDPA
and the transpose make ~7 per layer of a decode step."""

import torch
import torch.nn.functional as F

import ava_kernels

MAX_NEW_TOKENS = 16  # longer steps (a prompt) go to SDPA, whose tiled kernels win there
MAX_POSITIONS, MAX_HEAD_DIM = 8192, 256  # cached_attention.cu's kMaxPositions, kMaxHeadDim


def cached_attention_ref(q, k, v, cache_k, cache_v, pos, mask):
    """Store k, v (B, H, T, D) in cache_k, cache_v (B, H, S, D) at positions pos .. pos+T-1 (pos a
    device scalar), then attend q (B, H, T, D) to the whole cache under mask (T, S) or (B, 1, T, S)
    (True: may attend; it must hide positions not written yet) -> y (B, T, H*D)."""
    B, H, T, D = q.shape
    at = pos + torch.arange(T, device=q.device)                          # (T,)
    cache_k.index_copy_(2, at, k.to(cache_k.dtype))
    cache_v.index_copy_(2, at, v.to(cache_v.dtype))
    y = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, H * D)


def cached_attention(q, k, v, cache_k, cache_v, pos, mask):
    """cached_attention_ref's function through the CUDA kernel when it is available and the step
    is short (T <= 16 new tokens, S <= 8192, head dim <= 256, one dtype)."""
    (B, H, T, D), S = q.shape, cache_k.size(2)
    fits = T <= MAX_NEW_TOKENS and S <= MAX_POSITIONS and D <= MAX_HEAD_DIM and \
        q.dtype == k.dtype == cache_k.dtype == cache_v.dtype
    if fits and ava_kernels.use_cuda(q, cache_k, pos, mask):
        return torch.ops.ava.cached_attention(q, k, v, cache_k, cache_v, pos,
                                              mask.reshape(-1, T, S))
    return cached_attention_ref(q, k, v, cache_k, cache_v, pos, mask)


@torch.library.custom_op('ava::cached_attention', mutates_args=('cache_k', 'cache_v'))
def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                      cache_v: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask (Bm, T, S), Bm = 1 or B -> y (B, T, H*D); writes the new rows of cache_k, cache_v.
    Inference only: no autograd."""
    B, H, T, D = q.shape
    y = q.new_empty(B, T, H * D)
    torch.ops.ava_cuda.cached_attention(q.contiguous(), k.contiguous(), v.contiguous(), cache_k,
                                        cache_v, pos, mask.contiguous(), y)
    return y


@_cached_attention.register_fake
def _(q, k, v, cache_k, cache_v, pos, mask):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H * D)
