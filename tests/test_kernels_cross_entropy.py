"""Cross-entropy: the PyTorch twin against a float64 log-sum-exp formula with hand-derived gradients
(CPU), and the CUDA kernels against the twin in float64 (GPU only)."""

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import built, cuda, poison, rel_err
from ava_kernels.cross_entropy import cross_entropy, cross_entropy_ref


def some_targets(N, V, device='cpu'):
    """(N,) int64 in [0, V), every third row from row 1 on ignored (-1): row 0 always counts."""
    targets = torch.randint(V, (N,), device=device)
    targets[1::3] = -1
    return targets


def cross_entropy_float64(logits, targets):
    """Mean over kept rows of lse - x[target], and its gradient (softmax - onehot) / kept, 0 in
    ignored rows."""
    x = logits.double()
    kept = targets != -1                                                       # (N,)
    row_max = x.max(-1, keepdim=True).values
    lse = row_max + (x - row_max).exp().sum(-1, keepdim=True).log()             # (N, 1)
    picked = x.gather(1, targets.clamp(min=0)[:, None])                        # (N, 1)
    loss = ((lse - picked)[:, 0] * kept).sum() / kept.sum()
    onehot = torch.zeros_like(x).scatter_(1, targets.clamp(min=0)[:, None], 1.0)
    return loss, ((x - lse).exp() - onehot) * kept[:, None] / kept.sum()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('N,V', [(1, 5), (7, 1000), (4, 3)])
def test_ref_matches_float64_formula(N, V, dtype):
    logits = (torch.randn(N, V) * 4).to(dtype).requires_grad_()
    targets = some_targets(N, V)
    loss = cross_entropy_ref(logits, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    dlogits, = torch.autograd.grad(loss, logits, torch.tensor(1.7))
    loss64, dlogits64 = cross_entropy_float64(logits.detach(), targets)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(dlogits.double(), 1.7 * dlogits64, rtol=tol, atol=tol / V)
    assert (dlogits[1::3] == 0).all()


@cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize('N,V,offset', [(1, 5, 0), (7, 1000, 0), (300, 4096, 0), (64, 32768, 0),
                                        (33, 50257, 0), (9, 4160, 1), (5, 13, 0), (0, 100, 0)])
def test_cuda_matches_ref(N, V, offset, dtype, tol):
    """V <= 4096 takes a warp per row, larger V a CTA; offset 1 starts the logits one element past a
    16-byte boundary, which forces the scalar path (as does V % 8 != 0)."""
    built()
    logits = ((torch.randn(N * V + offset, device='cuda') * 3).to(dtype)[offset:].view(N, V)
              .requires_grad_())
    targets = some_targets(N, V, 'cuda')
    logits64 = logits.detach().double().requires_grad_()
    loss64 = cross_entropy_ref(logits64, targets)
    dlogits64, = torch.autograd.grad(loss64, logits64, torch.tensor(1.7, device='cuda',
                                                                    dtype=torch.float64))
    poison()
    loss = cross_entropy(logits, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    poison()
    dlogits, = torch.autograd.grad(loss, logits, torch.tensor(1.7, device='cuda'))
    assert dlogits.dtype == dtype and dlogits.shape == (N, V)
    if N == 0:
        assert loss.isnan() and loss64.isnan()  # a mean over no rows, as in PyTorch
        return
    assert rel_err(loss, loss64) < tol and rel_err(dlogits, dlogits64) < tol
    assert (dlogits[1::3] == 0).all()
    poison()
    loss_rows, lse = torch.ops.ava.cross_entropy_rows(logits.detach(), targets)
    assert rel_err(loss_rows, F.cross_entropy(logits64.detach(), targets, ignore_index=-1,
                                              reduction='none')) < tol
    assert rel_err(lse, logits64.detach().logsumexp(-1)) < tol


@cuda
@pytest.mark.parametrize('N,V', [(16, 4096), (4, 32768), (3, 50257)])
def test_cuda_extreme_logits_stay_finite(N, V):
    """Logits of exactly +-80 in bf16: exp(160) overflows fp32 without the max shift."""
    built()
    logits = (torch.randint(0, 2, (N, V), device='cuda') * 160.0 - 80).bfloat16().requires_grad_()
    targets = some_targets(N, V, 'cuda')
    logits64 = logits.detach().double().requires_grad_()
    loss64 = cross_entropy_ref(logits64, targets)
    dlogits64, = torch.autograd.grad(loss64, logits64)
    poison()
    loss = cross_entropy(logits, targets)
    poison()
    dlogits, = torch.autograd.grad(loss, logits)
    assert loss.isfinite() and dlogits.isfinite().all()
    assert rel_err(loss, loss64) < 1e-5 and rel_err(dlogits, dlogits64) < 1e-2


@cuda
def test_cuda_out_of_range_targets_give_nan():
    """The kernel's documented answer to a target outside [0, V) that is not -1: NaN loss and
    gradient rows."""
    built()
    V = 64
    logits = torch.randn(5, V, device='cuda')
    targets = torch.tensor([V, -2, 0, -1, V - 1], device='cuda')
    loss_rows, lse = torch.ops.ava.cross_entropy_rows(logits, targets)
    assert loss_rows[:2].isnan().all() and loss_rows[[2, 4]].isfinite().all() and loss_rows[3] == 0
    dlogits = torch.ops.ava.cross_entropy_rows_backward(torch.ones(5, device='cuda'), logits,
                                                        targets, lse)
    assert (dlogits[:2].isnan().all() and dlogits[[2, 4]].isfinite().all()
            and (dlogits[3] == 0).all())


@cuda
def test_opcheck_and_compile():
    built()
    logits = torch.randn(24, 1000, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    targets = some_targets(24, 1000, 'cuda')
    torch.library.opcheck(torch.ops.ava.cross_entropy_rows.default, (logits, targets))
    fn = lambda logits: cross_entropy(logits, targets) * 2  # noqa: E731
    eager, compiled = fn(logits), torch.compile(fn, fullgraph=True)(logits)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, logits)[0],
                               torch.autograd.grad(eager, logits)[0])
