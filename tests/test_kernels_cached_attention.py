"""Attention over the KV cache: the _ref twin against a float64 loop over queries and keys (CPU),
and the CUDA kernel against the loop (GPU only), with the cache rows past the new tokens full of NaN
that must not be read."""

import pytest
import torch

from kernel_utils import built, cuda, poison, rel_err
from ava_kernels.cached_attention import cached_attention, cached_attention_ref
from model import attention_mask


def loop_float64(q, k, v, cache_k, cache_v, pos, mask):
    """The cache after the write, and y (B, T, H*D): for each query, softmax over the keys its mask
    allows."""
    B, H, T, D = q.shape
    cache_k, cache_v = cache_k.double().clone(), cache_v.double().clone()
    cache_k[:, :, pos:pos + T], cache_v[:, :, pos:pos + T] = k.double(), v.double()
    mask = mask.reshape(-1, T, mask.size(-1)).expand(B, T, -1)
    y = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            keys = mask[b, t].nonzero()[:, 0]
            for h in range(H):
                scores = cache_k[b, h, keys] @ q[b, h, t].double() / D ** 0.5
                y[b, t, h] = scores.softmax(0) @ cache_v[b, h, keys]
    return cache_k, cache_v, y.view(B, T, H * D)


def make(B, H, T, D, S, pos, padded, dtype=torch.float32, device='cpu', offset=0):
    """New q, k, v, a cache holding pos positions and NaN beyond them, the model's mask (with left
    padding when padded). offset shifts q, k, v by that many elements from a 16-byte boundary."""
    gen = torch.Generator().manual_seed(B * 100 + T * 10 + pos)

    def randn(*shape):
        n = torch.Size(shape).numel()
        return torch.randn(n + offset, generator=gen)[offset:].view(shape).to(device=device,
                                                                              dtype=dtype)

    q, k, v = randn(B, H, T, D), randn(B, H, T, D), randn(B, H, T, D)
    cache_k, cache_v = randn(B, H, S, D), randn(B, H, S, D)
    cache_k[:, :, pos:], cache_v[:, :, pos:] = float('nan'), float('nan')
    positions = pos + torch.arange(T, device=device)
    pad = torch.randint(0, pos + 1, (B,), generator=gen).to(device) if padded else None
    return (q, k, v, cache_k, cache_v, torch.tensor(pos, device=device),
            attention_mask(positions, S, pad))


@pytest.mark.parametrize('B,H,T,D,S,pos,padded', [(1, 2, 1, 8, 16, 0, False),
                                                  (2, 3, 4, 6, 20, 9, True),
                                                  (3, 1, 2, 4, 12, 10, False)])
def test_ref_matches_loop(B, H, T, D, S, pos, padded):
    q, k, v, cache_k, cache_v, pos_t, mask = make(B, H, T, D, S, pos, padded)
    # SDPA multiplies masked values by 0: NaN would spread
    cache_k[:, :, pos + T:], cache_v[:, :, pos + T:] = 0, 0
    ref_k, ref_v, ref_y = loop_float64(q, k, v, cache_k, cache_v, pos, mask)
    y = cached_attention_ref(q, k, v, cache_k, cache_v, pos_t, mask)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-6)
    assert torch.equal(cache_k.double(), ref_k) and torch.equal(cache_v.double(), ref_v)


@cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize('B,H,T,D,S,pos,padded,offset', [
    (1, 8, 1, 64, 1024, 0, False, 0),     # the first decode step of config/small.py
    (1, 8, 1, 64, 1024, 700, False, 0),
    (32, 8, 1, 64, 1024, 15, True, 0),    # batch 32, left-padded prompts
    (1, 8, 4, 64, 1024, 300, False, 0),   # a speculative step: 4 tokens, causal among themselves
    (2, 3, 16, 256, 64, 48, True, 0),     # the largest head and step
    (2, 3, 5, 7, 33, 11, True, 0),        # odd head size: the scalar path
    (1, 2, 2, 16, 40, 3, False, 1),       # q, k, v off a 16-byte boundary: the scalar path
    (1, 2, 1, 64, 8192, 8191, False, 0),  # the last position of the longest cache
    (0, 2, 1, 16, 8, 0, False, 0),        # an empty batch
])
def test_cuda_matches_loop(B, H, T, D, S, pos, padded, offset, dtype, tol):
    built()
    q, k, v, cache_k, cache_v, pos_t, mask = make(B, H, T, D, S, pos, padded, dtype, 'cuda', offset)
    ref_k, ref_v, ref_y = loop_float64(q.cpu(), k.cpu(), v.cpu(), cache_k.cpu(), cache_v.cpu(), pos,
                                       mask.cpu())
    poison()
    y = cached_attention(q, k, v, cache_k, cache_v, pos_t, mask)
    assert y.dtype == dtype and y.shape == (B, T, H * D)
    assert rel_err(y.cpu(), ref_y) < tol
    written = slice(pos, pos + T)
    assert torch.equal(cache_k[:, :, written].cpu().double(), ref_k[:, :, written])
    assert torch.equal(cache_v[:, :, written].cpu().double(), ref_v[:, :, written])
    assert torch.equal(cache_k[:, :, :pos].cpu().double(), ref_k[:, :, :pos])  # the rest untouched


@cuda
def test_cuda_opcheck_compile_and_graph():
    built()
    q, k, v, cache_k, cache_v, pos, mask = make(2, 4, 1, 32, 64, 20, True, torch.bfloat16, 'cuda')
    cache_k[:, :, 20:], cache_v[:, :, 20:] = 0, 0  # opcheck compares with a run of the twin
    torch.library.opcheck(torch.ops.ava.cached_attention.default,
                          (q, k, v, cache_k.clone(), cache_v.clone(), pos, mask.reshape(-1, 1, 64)))
    eager = cached_attention(q, k, v, cache_k.clone(), cache_v.clone(), pos, mask)
    compiled = torch.compile(cached_attention, fullgraph=True)
    assert torch.equal(compiled(q, k, v, cache_k.clone(), cache_v.clone(), pos, mask), eager)
    # one graph, every position: pos and the mask are read on the device
    graph, at = torch.cuda.CUDAGraph(), torch.tensor(0, device='cuda')
    inputs = [q.clone(), k.clone(), v.clone(), cache_k.clone(), cache_v.clone(), at, mask.clone()]
    cached_attention(*inputs)  # warm-up off the graph
    with torch.cuda.graph(graph):
        captured = cached_attention(*inputs)
    inputs[3].copy_(cache_k)  # undo the warm-up's write at position 0
    inputs[4].copy_(cache_v)
    inputs[5].fill_(20)
    graph.replay()
    assert torch.equal(captured, eager)
