"""
Each CUDA op against its eager `_ref` twin and against torch.compile(`_ref`), forward and
forward+backward, at the shapes of one micro-step of config/small.py (32 x 1024 tokens, C=512,
V=32768, E=8, K=2, H=8); the decode ops (moe_decode, cached_attention, norm_qkv_rope) at one
decode step of batch 32 halfway through a 1024-token cache, in a bf16 model. Times are the GPU
time of the kernels each call launches (torch.profiler); bandwidth is the fewest bytes the op must
move (each input read once, each output written once) over that time, next to a measured
device-to-device copy ceiling.

    python kernels/bench.py                 # every op
    python kernels/bench.py --op=rms_norm   # one op
"""

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ava_kernels  # noqa: E402
from ava_kernels import (cached_attention, cross_entropy, moe_decode, moe_permute,  # noqa: E402
                         moe_sort, moe_unpermute, norm_qkv_rope, qkv_rope, rms_norm, sinkhorn_topk)

N, C, V, E, K, H, T = 32 * 1024, 512, 32768, 8, 2, 8, 1024
M = N * K


def median_ms(fn, reps=30):
    """Median of reps event-timed calls after a warm-up (for the copy ceiling: one long kernel)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_ms(fn, calls=10):
    """Mean GPU time of the kernels one call launches (torch.profiler). Event timing around a single
    sub-millisecond op measures Python's dispatch as much as the GPU; the kernels' own time is what
    bandwidth is about (bench.py measures whole training steps, launch gaps included)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / calls / 1000


def copy_ceiling_gbs():
    """A 1 GiB device-to-device copy: bytes read plus bytes written, per second."""
    src = torch.randn(2**28, device='cuda')
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e6


def routing():
    """Index maps of a random top-K routing of N tokens (none dropped), laid out as MoE.forward lays
    them out."""
    expert = torch.rand(N, E, device='cuda').topk(K, dim=-1).indices            # (N, K)
    keep = torch.ones_like(expert, dtype=torch.bool)
    _, row_src, assignment_row = ava_kernels.moe_sort_ref(expert, keep, E)
    return row_src, assignment_row


def cases():
    """name -> (op, ref, make_inputs() -> args, bytes forward, bytes backward): args[0] (and gates)
    get gradients when the op has a backward; the op runs under bf16 autocast like the model."""
    row_src, assignment_row = routing()
    angles = torch.arange(T, device='cuda')[:, None] * torch.rand(C // H // 2, device='cuda')

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device='cuda', dtype=dtype)

    bf16 = torch.bfloat16
    Fh, S, pos = 4 * C, T, T // 2  # decode: expert width, cache length, cached positions
    decode_q = lambda: randn(32, H, 1, C // H, dtype=bf16)  # noqa: E731
    return {
        'rms_norm': (rms_norm, ava_kernels.rms_norm_ref,
                     lambda: [randn(N, C), torch.rand(C, device='cuda') + 0.5, 1e-6],
                     N * C * (4 + 2), N * C * (2 + 4 + 4)),
        'cross_entropy': (cross_entropy, ava_kernels.cross_entropy_ref,
                          lambda: [randn(N, V, dtype=bf16) * 3,
                                   torch.randint(V, (N,), device='cuda')],
                          N * V * 2, N * V * (2 + 2)),
        'moe_permute': (moe_permute, ava_kernels.moe_permute_ref,
                        lambda: [randn(N, C, dtype=bf16), row_src, assignment_row],
                        (N + M) * C * 2, (M + N) * C * 2),
        'moe_unpermute': (moe_unpermute, ava_kernels.moe_unpermute_ref,
                          lambda: [randn(M, C, dtype=bf16), torch.rand(N, K, device='cuda'),
                                   row_src, assignment_row],
                          M * C * 2 + N * C * 4, N * C * 4 + M * C * (2 + 2)),
        'qkv_rope': (qkv_rope, ava_kernels.qkv_rope_ref,
                     lambda: [randn(N // T, T, 3 * C, dtype=bf16), angles.cos(), angles.sin(), H],
                     2 * 3 * N * C * 2, 2 * 3 * N * C * 2),
        'sinkhorn_topk': (sinkhorn_topk, ava_kernels.sinkhorn_topk_ref,
                          lambda: [randn(N, E), 8, K, torch.zeros(E, device='cuda')],
                          N * E * 4 + N * K * 8, 0),
        'moe_sort': (moe_sort, ava_kernels.moe_sort_ref,
                     lambda: [torch.rand(N, E, device='cuda').topk(K, dim=-1).indices,
                              torch.ones(N, K, dtype=torch.bool, device='cuda'), E],
                     2 * M * 9 + M * 8, 0),
        'moe_decode': (moe_decode, ava_kernels.moe_decode_ref,
                       lambda: [randn(32, C, dtype=bf16), randn(32, C, dtype=bf16),
                                1 + randn(C, dtype=bf16) / 10, 1e-6, randn(E, C, dtype=bf16),
                                None, randn(E, Fh, C, dtype=bf16) * 0.02,
                                randn(E, C, Fh, dtype=bf16) * 0.02, K, 'gelu'],
                       2 * E * C * Fh * 2, 0),  # every expert's weights, once (batch 32 hits all)
        'cached_attention': (cached_attention, ava_kernels.cached_attention_ref,
                             lambda: [decode_q(), decode_q(), decode_q(),
                                      randn(32, H, S, C // H, dtype=bf16),
                                      randn(32, H, S, C // H, dtype=bf16),
                                      torch.tensor(pos, device='cuda'),
                                      torch.arange(S, device='cuda')[None] <= pos],
                             2 * 32 * (pos + 1) * C * 2, 0),  # the cached keys and values, once
        'norm_qkv_rope': (norm_qkv_rope, ava_kernels.norm_qkv_rope_ref,
                          lambda: [randn(32, 1, C, dtype=bf16), 1 + randn(C, dtype=bf16) / 10,
                                   1e-6, randn(3 * C, C, dtype=bf16) / C ** 0.5,
                                   angles[pos:pos + 1].cos(), angles[pos:pos + 1].sin(), H],
                          3 * C * C * 2 + 4 * 32 * C * 2, 0),  # w_qkv, x and q, k, v, once
    }


def run(name, op, ref, make_inputs, bytes_fwd, bytes_bwd, ceiling):
    compiled = torch.compile(ref)
    sets = [make_inputs() for _ in range(3)]  # rotate inputs so no timing reads a warm L2
    differentiable = (0, 1) if name == 'moe_unpermute' else (0,)  # ys and gates; else the input
    for args in sets:
        for i in differentiable:
            args[i].requires_grad_(bytes_bwd > 0)
    row, upstream = [name], {}  # upstream gradients: once per input set, outside the timed calls
    for fn in (op, ref, compiled):
        calls = iter(range(10**9))

        def forward():
            with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
                fn(*sets[next(calls) % 3])

        def forward_backward():
            i = next(calls) % 3
            with torch.autocast('cuda', dtype=torch.bfloat16):
                out = fn(*sets[i])
            outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
            if i not in upstream:
                upstream[i] = [torch.randn_like(o) for o in outs]
            leaves = [a for a in sets[i] if isinstance(a, torch.Tensor) and a.requires_grad]
            torch.autograd.grad(outs, leaves, upstream[i])  # not .backward(): nothing into .grad

        ava_kernels.enabled = fn is op
        row.append(gpu_ms(forward))
        row.append(gpu_ms(forward_backward) if bytes_bwd else float('nan'))
    ava_kernels.enabled = True
    fwd_gbs = bytes_fwd / row[1] / 1e6
    bwd_gbs = bytes_bwd / (row[2] - row[1]) / 1e6 if bytes_bwd else float('nan')
    print(f"{name:14s} fwd {row[1]:7.3f} ms ({fwd_gbs:6.0f} GB/s, {fwd_gbs / ceiling:4.0%})  "
          f"fwd+bwd {row[2]:7.3f} ms (bwd {bwd_gbs:6.0f} GB/s, {bwd_gbs / ceiling:4.0%}) | "
          f"ref {row[3]:7.3f} / {row[4]:7.3f} ms | compiled ref {row[5]:7.3f} / {row[6]:7.3f} ms")


def main():
    only = next((a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--op=')), None)
    if not torch.cuda.is_available() or ava_kernels.build() is not True:
        sys.exit("error: kernels/bench.py needs a CUDA device and the built kernels")
    ceiling = copy_ceiling_gbs()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {ceiling:,.0f} GB/s "
          "(read + write)")
    for name, case in cases().items():
        if only in (None, name):
            run(name, *case, ceiling)


if __name__ == '__main__':
    main()
