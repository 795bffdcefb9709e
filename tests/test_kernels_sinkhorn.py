"""Sinkhorn-balanced top-k: the PyTorch twin against the textbook matrix form in float64 (CPU), and
the CUDA kernel against the twin in float64 (GPU only). Indices, not values: a near-tie may flip
one, so the CUDA tests ask for >= 99.9% equal indices and nearly equal per-expert counts."""

import math

import pytest
import torch

from kernel_utils import built, cuda, poison
from ava_kernels.sinkhorn import sinkhorn, sinkhorn_topk, sinkhorn_topk_ref


def sinkhorn_float64(logits, n_iters):
    """P = exp(logits); alternately divide each row by its sum, then each column by its sum /
    (N/E)."""
    P = logits.double().exp()
    N, E = P.shape
    for _ in range(n_iters):
        P = P / P.sum(dim=1, keepdim=True)
        P = P / P.sum(dim=0, keepdim=True) * (N / E)
    return P


def topk_from_column_scalings(logits, n_iters, k, bias):
    """The kernel's algorithm in float64: keep only the column scalings v (E,); the row scalings u
    are recomputed from v each round and dropped, since they do not change a row's top-k. The bias
    comes last."""
    x = logits.double()
    N, E = x.shape
    v = torch.zeros(E, dtype=torch.float64)
    for _ in range(n_iters):
        u = -torch.logsumexp(x + v, dim=1, keepdim=True)                        # (N, 1)
        v = v + math.log(N / E) - torch.logsumexp(x + u + v, dim=0)             # (E,)
    return (x + v + bias).topk(k, dim=-1).indices


CPU_CASES = [(256, 8, 2, 8, 1.0), (300, 4, 1, 3, 5.0), (64, 64, 64, 8, 1.0), (7, 3, 3, 1, 0.1),
             (1, 5, 2, 4, 1.0), (50, 6, 2, 0, 1.0)]  # (N, E, K, n_iters, scale)


@pytest.mark.parametrize('N,E,K,n_iters,scale', CPU_CASES)
def test_ref_matches_float64_matrix_form(N, E, K, n_iters, scale):
    gen = torch.Generator().manual_seed(N + E)
    logits = torch.randn(N, E, generator=gen) * scale
    logits[:, 0] += 1.0                                        # a favourite for balancing to undo
    expected = sinkhorn_float64(logits, n_iters)
    balanced = sinkhorn(logits, n_iters)
    torch.testing.assert_close(balanced.double(), expected, rtol=1e-4, atol=1e-7)
    if n_iters > 0:
        torch.testing.assert_close(balanced.double().sum(dim=0),
                                   torch.full((E,), N / E, dtype=torch.float64),
                                   rtol=1e-5, atol=0)          # columns hold N/E exactly
    for bias in (torch.zeros(E), torch.randn(E, generator=gen) * 0.5):
        idx = sinkhorn_topk_ref(logits, n_iters, K, bias)
        assert idx.dtype == torch.int64 and idx.shape == (N, K)
        assert torch.equal(idx, (expected.log() + bias.double()).topk(K, dim=-1).indices)
        # the kernel's shortcut is exact
        assert torch.equal(idx, topk_from_column_scalings(logits, n_iters, K, bias))


def test_ref_balances_a_favourite():
    """Every token prefers expert 0: plain top-1 piles onto it, the balanced top-1 spreads tokens
    evenly."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 8, generator=gen) * 2
    logits[:, 0] += 3.0
    plain = torch.bincount(sinkhorn_topk_ref(logits, 0, 1, torch.zeros(8)).flatten(),
                           minlength=8).float()
    even = torch.bincount(sinkhorn_topk_ref(logits, 8, 1, torch.zeros(8)).flatten(),
                          minlength=8).float()
    assert plain.max() / plain.mean() > 4 and even.max() / even.mean() < 1.1


def check_against_ref(logits, n_iters, K, bias=None):
    """The CUDA kernel's picks against the float64 twin: valid, distinct per row, >= 99.9% equal,
    same loads."""
    N, E = logits.shape
    bias = torch.zeros(E, device=logits.device) if bias is None else bias
    poison()
    got = sinkhorn_topk(logits, n_iters, K, bias)
    want = sinkhorn_topk_ref(logits.double(), n_iters, K, bias.double())
    assert got.dtype == torch.int64 and got.shape == (N, K) and got.is_cuda
    assert ((got >= 0) & (got < E)).all()
    assert (got.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct experts per token
    if N == 1 and n_iters > 0:
        # one token fills every column alone: balanced, all E entries tie,
        # so any K experts are right
        return
    assert (got == want).double().mean().item() >= 0.999
    got_load, want_load = (torch.bincount(t.flatten(), minlength=E) for t in (got, want))
    assert (got_load - want_load).abs().max().item() <= 1 + 1e-3 * N * K / E


SHAPES = [(N, E, K) for N in (1, 7, 1000, 32768) for E in (1, 4, 8, 64) for K in sorted({1, 2, E})
          if K <= E]


@cuda
@pytest.mark.parametrize('N,E,K', SHAPES)
def test_cuda_matches_ref(N, E, K):
    built()
    gen = torch.Generator('cuda').manual_seed(N * 100 + E * 10 + K)
    for scale in (0.1, 1.0, 5.0):
        check_against_ref(torch.randn(N, E, device='cuda', generator=gen) * scale, 8, K)
    check_against_ref(torch.randn(N, E, device='cuda', generator=gen), 8, K,
                      bias=torch.randn(E, device='cuda', generator=gen) * 0.3)


@cuda
@pytest.mark.parametrize('n_iters', [0, 1, 2, 30])
def test_cuda_iteration_counts(n_iters):
    built()
    gen = torch.Generator('cuda').manual_seed(n_iters)
    logits = torch.randn(5000, 8, device='cuda', generator=gen)
    logits[:, 3] += 2.0                                                          # a favourite
    check_against_ref(logits, n_iters, 2)


@cuda
def test_cuda_large_logits_and_favourites():
    """|logits| in the hundreds: exp without the row-max shift would overflow."""
    built()
    gen = torch.Generator('cuda').manual_seed(1)
    logits = torch.randn(3000, 16, device='cuda', generator=gen) * 50
    logits[:, 5] += 100.0
    check_against_ref(logits, 8, 2)


@cuda
def test_cuda_deterministic_and_empty():
    """No float atomics: the same input gives bit-identical picks. N = 0 launches nothing."""
    built()
    logits = torch.randn(32768, 8, device='cuda')
    bias = torch.randn(8, device='cuda') * 0.1
    assert torch.equal(sinkhorn_topk(logits, 8, 2, bias), sinkhorn_topk(logits, 8, 2, bias))
    empty = sinkhorn_topk(torch.randn(0, 8, device='cuda'), 8, 2, bias)
    assert empty.shape == (0, 2) and empty.dtype == torch.int64


@cuda
def test_cuda_opcheck():
    built()
    torch.library.opcheck(torch.ops.ava.sinkhorn_topk.default,
                          (torch.randn(300, 8, device='cuda'), torch.randn(8, device='cuda'), 8, 2))


@cuda
def test_cuda_compile():
    built()
    logits = torch.randn(4096, 8, device='cuda')

    def route(logits):
        return sinkhorn_topk(logits * 2, 8, 2, torch.ones(8, device=logits.device) * 0.1)

    assert torch.equal(torch.compile(route, fullgraph=True)(logits), route(logits))
