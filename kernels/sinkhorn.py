"""Sinkhorn-Knopp balanced top-k routing (Cuturi 2013; used for MoE routing in BASE layers, Lewis et
al. 2021, and Clark et al. 2022) as one kernel (sinkhorn.cu), where eager PyTorch makes ~4 small
kernels per round.

Alternately rescale the rows of the (N, E) token-by-expert matrix P = exp(logits) so each token's
mass is 1, and its columns so each expert's mass is N/E. The result is a (scaled) doubly-stochastic
matrix close to P: top-k on it spreads tokens evenly over experts while still preferring what the
router likes. A fixed number of rounds, so no host sync. Balance is exact for the soft mass; the
hard top-k counts follow it when the logits vary across tokens, as they do once the router trains.
(Logits that are nearly the same for every token, plus one favourite, are the worst case: mass is
spread thinly and argmax counts can still be skewed; the training log shows the load.)

The kernel keeps only the E column scalings: in log space the balanced matrix is
logits[i, j] + u[i] + v[j], and the row scaling u[i] is the same for a whole row, so it changes no
row's top-k (sinkhorn.cu has the algebra). The result is indices, so there is no backward: the
router's gates get their gradient from its plain softmax, gathered at these indices (model.Router),
never through the balancing.
"""

import math

import torch

import ava_kernels


def sinkhorn_log(logits, n_iters):
    """logits (N, E) -> the log of the balanced matrix (N, E) after n_iters rounds of (rows sum to
    1, columns sum to N/E), computed in log space in fp32 (float64 stays float64)."""
    N, E = logits.shape
    log_p = logits.to(torch.promote_types(logits.dtype, torch.float32))
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)                  # rows: 1
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + math.log(N / E)  # cols: N/E
    return log_p


def sinkhorn(logits, n_iters):
    """logits (N, E) -> the balanced matrix (N, E): exp(sinkhorn_log(logits, n_iters))."""
    return sinkhorn_log(logits, n_iters).exp()


def sinkhorn_topk_ref(logits, n_iters, k, bias):
    """logits (N, E), bias (E,) -> expert_idx (N, k) int64: each row's k largest entries of
    sinkhorn_log(logits, n_iters) + bias, largest first. The bias steers the hard top-k counts,
    which the soft balance does not fix (model.Router); it must come after the balancing, which
    would cancel any per-expert shift of the logits. n_iters = 0 is plain top-k on logits + bias."""
    return (sinkhorn_log(logits, n_iters) + bias).topk(k, dim=-1).indices


def sinkhorn_topk(logits, n_iters, k, bias):
    """sinkhorn_topk_ref's function through the CUDA kernel when it is available (and E <= 64, else
    the twin)."""
    if ava_kernels.use_cuda(logits, bias) and logits.size(1) <= 64:
        return torch.ops.ava.sinkhorn_topk(logits, bias, n_iters, k)
    return sinkhorn_topk_ref(logits, n_iters, k, bias)


@torch.library.custom_op('ava::sinkhorn_topk', mutates_args=())
def _sinkhorn_topk(logits: torch.Tensor, bias: torch.Tensor, n_iters: int, k: int) -> torch.Tensor:
    """-> expert_idx (N, k) int64. No autograd registration: indices have no gradient."""
    expert_idx = logits.new_empty(logits.size(0), k, dtype=torch.long)
    torch.ops.ava_cuda.sinkhorn_topk(logits.float().contiguous(), bias.float().contiguous(),
                                     n_iters, expert_idx)
    return expert_idx


@_sinkhorn_topk.register_fake
def _(logits, bias, n_iters, k):
    return logits.new_empty(logits.size(0), k, dtype=torch.long)
