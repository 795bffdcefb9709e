"""What every CUDA kernel test needs (tests/test_kernels_*.py): a skip mark, NaN-poisoned memory,
the error metric."""

import pytest
import torch

import ava_kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def built():
    """The CUDA library, built: a failed build fails the test instead of silently testing the _ref
    twin."""
    assert ava_kernels.build() is True
    ava_kernels.enabled = True


def poison():
    """Fill the memory the caching allocator hands out next (its large and its small pool) with NaN,
    so outputs a kernel fails to write show up."""
    junk = [torch.empty(1 << 26, device='cuda')]
    junk += [torch.empty(1 << 16, device='cuda') for _ in range(64)]
    for t in junk:
        t.fill_(float('nan'))
    del junk, t


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64: fp32 rounding lands far under 1e-5, bf16's (8 mantissa
    bits) between 1e-3 and 1e-2, so the tests ask for < 1e-5 and < 1e-2. An all-zero (or empty) ref
    demands an all-zero out; NaN never passes a `<` test."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
