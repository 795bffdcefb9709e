"""MoE sort, permute and unpermute: the _ref twins against slow Python loops (CPU), and the CUDA
kernels against the twins (the sort exactly, the others in float64, forward and backward;
CUDA only)."""

import pytest
import torch

from kernel_utils import built, cuda, poison, rel_err
from ava_kernels.moe_permute import (moe_permute, moe_permute_ref, moe_sort, moe_sort_ref,
                                 moe_unpermute, moe_unpermute_ref)


def make_layout(N, K, E, drop, shuffle, seed=0):
    """(row_src (M,), assignment_row (N, K)) int32 as the model builds them: assignments sorted by
    expert, dropped ones (probability drop) last as unused rows. With shuffle the rows are permuted,
    so unused rows sit anywhere."""
    gen = torch.Generator().manual_seed(seed)
    M = N * K
    expert = torch.randint(E, (N, K), generator=gen)
    keep = torch.rand(N, K, generator=gen) >= drop
    flat = torch.where(keep, expert, E).flatten()              # (M,) dropped -> sentinel expert E
    order = flat.argsort(stable=True)                          # (M,) assignment in each row
    row_src = torch.where(flat[order] < E, order, -1)
    if shuffle:
        row_src = row_src[torch.randperm(M, generator=gen)]
    used = row_src >= 0
    assignment_row = torch.full((M,), -1, dtype=torch.long)
    assignment_row[row_src[used]] = torch.arange(M)[used]
    return row_src.int(), assignment_row.view(N, K).int()


def loop_reference(x, ys, gates, dxs, dout, row_src, assignment_row):
    """Forward and backward of both ops, one (token, k) or row at a time, in float64."""
    N, K = assignment_row.shape
    M, C = ys.shape
    xs, dys = torch.zeros(M, C, dtype=torch.float64), torch.zeros(M, C, dtype=torch.float64)
    out, dx = torch.zeros(N, C, dtype=torch.float64), torch.zeros(N, C, dtype=torch.float64)
    dgates = torch.zeros(N, K, dtype=torch.float64)
    for r, a in enumerate(row_src.tolist()):
        if a >= 0:
            xs[r] = x[a // K].double()
            dys[r] = gates[a // K, a % K].double() * dout[a // K].double()
    for t in range(N):
        for k in range(K):
            r = int(assignment_row[t, k])
            if r >= 0:
                out[t] += gates[t, k].double() * ys[r].double()
                dx[t] += dxs[r].double()
                dgates[t, k] = ys[r].double() @ dout[t].double()
    return xs, out, dx, dys, dgates


@pytest.mark.parametrize('shuffle', [False, True])
@pytest.mark.parametrize('K', [1, 3])
def test_refs_match_loops(K, shuffle):
    N, C = 9, 5
    row_src, assignment_row = make_layout(N, K, E=4, drop=0.3, shuffle=shuffle)
    assert (row_src < 0).any()                          # some dropped assignments, some unused rows
    x = torch.randn(N, C, requires_grad=True)
    ys = torch.randn(N * K, C)
    ys[row_src < 0] = float('nan')                      # garbage that must never be read
    ys.requires_grad_()
    gates = torch.rand(N, K, requires_grad=True)
    dxs, dout = torch.randn(N * K, C), torch.randn(N, C)
    xs, out = (moe_permute_ref(x, row_src, assignment_row),
               moe_unpermute_ref(ys, gates, row_src, assignment_row))
    (xs * dxs).sum().backward()
    (out * dout).sum().backward()
    expected = loop_reference(x.detach(), ys.detach(), gates.detach(), dxs, dout, row_src,
                              assignment_row)
    for got, want in zip((xs, out, x.grad, ys.grad, gates.grad), expected):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# (N, K, C, drop, shuffle): tiny, odd C (scalar path), C = 512 (vector path), K = 1/2/4, dropped
# assignments, unused rows anywhere, every assignment dropped, M = 0
CASES = [(1, 1, 13, 0.0, False), (1, 2, 512, 0.0, False), (37, 4, 13, 0.2, True),
         (300, 2, 512, 0.1, False), (300, 2, 512, 0.1, True), (50, 3, 24, 0.3, True),
         (20, 2, 64, 1.0, False), (0, 2, 16, 0.0, False)]


def cuda_case(N, K, C, drop, shuffle, dtype):
    row_src, assignment_row = (t.cuda() for t in make_layout(N, K, E=8, drop=drop, shuffle=shuffle))
    ys = torch.randn(N * K, C, device='cuda', dtype=dtype)
    ys[row_src < 0] = float('nan')
    return row_src, assignment_row, ys


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('N,K,C,drop,shuffle', CASES)
def test_cuda_matches_ref(N, K, C, drop, shuffle, dtype):
    built()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    row_src, assignment_row, ys = cuda_case(N, K, C, drop, shuffle, dtype)
    x = torch.randn(N, C, device='cuda', dtype=dtype, requires_grad=True)
    gates = torch.rand(N, K, device='cuda', requires_grad=True)
    ys.requires_grad_()
    poison()
    xs = moe_permute(x, row_src, assignment_row)
    poison()
    out = moe_unpermute(ys, gates, row_src, assignment_row)
    dxs, dout = torch.randn_like(xs), torch.randn_like(out)
    poison()
    dx, = torch.autograd.grad(xs, x, dxs)
    poison()
    dys, dgates = torch.autograd.grad(out, (ys, gates), dout)
    x64, ys64, gates64 = (t.detach().double().requires_grad_() for t in (x, ys, gates))
    xs_ref, out_ref = (moe_permute_ref(x64, row_src, assignment_row),
                       moe_unpermute_ref(ys64, gates64, row_src, assignment_row))
    dx_ref, = torch.autograd.grad(xs_ref, x64, dxs.double())
    dys_ref, dgates_ref = torch.autograd.grad(out_ref, (ys64, gates64), dout.double())
    assert ((xs.dtype, dx.dtype, dys.dtype, out.dtype, dgates.dtype)
            == (dtype,) * 3 + (torch.float32,) * 2)
    for got, want in ((xs, xs_ref), (out, out_ref), (dx, dx_ref), (dys, dys_ref),
                      (dgates, dgates_ref)):
        assert rel_err(got, want) < tol


@cuda
def test_cuda_autocast_permute():
    """fp32 residual in, bf16 rows out under autocast; the gradient comes back fp32."""
    built()
    row_src, assignment_row, _ = cuda_case(100, 2, 512, 0.1, False, torch.float32)
    x = torch.randn(100, 512, device='cuda', requires_grad=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        xs = moe_permute(x, row_src, assignment_row)
    dxs = torch.randn_like(xs)
    dx, = torch.autograd.grad(xs, x, dxs)
    x64 = x.detach().double().requires_grad_()
    dx_ref, = torch.autograd.grad(moe_permute_ref(x64, row_src, assignment_row), x64, dxs.double())
    assert xs.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert (rel_err(xs, moe_permute_ref(x64, row_src, assignment_row)) < 1e-2
            and rel_err(dx, dx_ref) < 1e-5)


@cuda
def test_cuda_opcheck():
    built()
    row_src, assignment_row, _ = cuda_case(33, 2, 40, 0.2, True, torch.bfloat16)
    x = torch.randn(33, 40, device='cuda', requires_grad=True)
    # finite: opcheck compares
    ys = torch.randn(66, 40, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    gates = torch.rand(33, 2, device='cuda', requires_grad=True)
    torch.library.opcheck(torch.ops.ava.moe_permute.default,
                          (x, row_src, assignment_row, torch.bfloat16))
    torch.library.opcheck(torch.ops.ava.moe_unpermute.default, (ys, gates, row_src, assignment_row))
    torch.library.opcheck(torch.ops.ava.moe_permute_backward.default,
                          (ys.detach(), assignment_row, torch.float32))
    torch.library.opcheck(torch.ops.ava.moe_unpermute_backward.default,
                          (torch.randn(33, 40, device='cuda'), ys.detach(), gates.detach(),
                           row_src))


@cuda
def test_cuda_compile():
    built()
    row_src, assignment_row, _ = cuda_case(64, 2, 256, 0.1, False, torch.float32)

    def layer(x, gates):  # permute, a stand-in for the experts, unpermute
        return moe_unpermute(moe_permute(x, row_src, assignment_row) * 2 + 1, gates, row_src,
                             assignment_row)

    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        x = torch.randn(64, 256, device='cuda', generator=torch.Generator('cuda').manual_seed(0),
                        requires_grad=True)
        gates = torch.rand(64, 2, device='cuda', generator=torch.Generator('cuda').manual_seed(1),
                           requires_grad=True)
        out = fn(x, gates)
        out.square().sum().backward()
        results.append((out, x.grad, gates.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def sort_loop(expert_idx, keep, E):
    """The layout by hand: rows go to expert 0's kept assignments in order, then expert 1's, ...,
    then the dropped."""
    flat_expert, flat_keep = expert_idx.flatten().tolist(), keep.flatten().tolist()
    order = [a for e in range(E) for a, (x, k) in enumerate(zip(flat_expert, flat_keep))
             if k and x == e]
    n_kept = len(order)
    order += [a for a, k in enumerate(flat_keep) if not k]
    offsets = [sum(1 for x, k in zip(flat_expert, flat_keep) if k and x <= e) for e in range(E)]
    row_src = [a if r < n_kept else -1 for r, a in enumerate(order)]
    assignment_row = [-1] * len(order)
    for r, a in enumerate(order[:n_kept]):
        assignment_row[a] = r
    return offsets, row_src, assignment_row


def random_routing(N, K, E, drop, seed=0, device='cpu'):
    """expert_idx (N, K): K distinct experts per token, skewed toward low ids; keep (N, K) with
    drops."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(N, E, generator=gen) + torch.linspace(1, 0, E) * 0.5
    keep = torch.rand(N, K, generator=gen) >= drop
    return scores.topk(K, dim=-1).indices.to(device), keep.to(device)


# (N, K, E, drop): one token, odd sizes, E = 1, many experts, everything dropped, no tokens
SORT_CASES = [(1, 1, 4, 0.0), (37, 3, 5, 0.3), (64, 1, 1, 0.0), (200, 2, 8, 0.1), (50, 4, 64, 0.2),
              (20, 2, 4, 1.0), (0, 2, 8, 0.0)]


@pytest.mark.parametrize('N,K,E,drop', SORT_CASES)
def test_sort_ref_matches_loop(N, K, E, drop):
    expert_idx, keep = random_routing(N, K, E, drop)
    offsets, row_src, assignment_row = moe_sort_ref(expert_idx, keep, E)
    assert all(t.dtype == torch.int32 for t in (offsets, row_src, assignment_row))
    assert offsets.shape == (E,) and row_src.shape == (N * K,) and assignment_row.shape == (N, K)
    want = sort_loop(expert_idx, keep, E)
    assert (offsets.tolist(), row_src.tolist(), assignment_row.flatten().tolist()) == want


@cuda
@pytest.mark.parametrize('N,K,E,drop', SORT_CASES + [(300_000, 2, 8, 0.05), (70_001, 3, 256, 0.0)])
def test_cuda_sort_equals_ref(N, K, E, drop):
    """Integers: the kernel's layout must equal the twin's (a stable sort) exactly, across many
    blocks too."""
    built()
    expert_idx, keep = random_routing(N, K, E, drop, device='cuda')
    poison()
    got = moe_sort(expert_idx, keep, E)
    want = moe_sort_ref(expert_idx, keep, E)
    for g, w in zip(got, want):
        assert g.dtype == torch.int32 and g.shape == w.shape and torch.equal(g, w)


@cuda
def test_cuda_sort_opcheck_and_compile():
    built()
    expert_idx, keep = random_routing(333, 2, 8, 0.1, device='cuda')
    torch.library.opcheck(torch.ops.ava.moe_sort.default, (expert_idx, keep, 8))
    compiled = torch.compile(lambda i, k: moe_sort(i, k, 8), fullgraph=True)
    for g, w in zip(compiled(expert_idx, keep), moe_sort_ref(expert_idx, keep, 8)):
        assert torch.equal(g, w)
