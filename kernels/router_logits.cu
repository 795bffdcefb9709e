// The router's logits in fp32 from the normed activations as they are (bf16 under autocast),
// forward and backward, where the unfused path makes an fp32 copy of the activations, multiplies
// it (in TF32 on the tensor cores when allowed), and in backward writes an fp32 gradient and casts
// it: ~6 passes over an (N, C) tensor for an (N, E) result.
//   forward:  logits (N, E) fp32 = x (N, C) . w (E, C)^T, fp32 products and sums
//   backward: dx (N, C) in x's dtype = dlogits (N, E) . w, rounded once
//             dw_partial (blocks, E, C) fp32: each block's rows of dlogits^T . x, summed over
//             blocks by the caller
// Shapes: x fp32 or bf16, w and dlogits fp32, any E (taken 8 experts at a time).
//   forward: a warp per row; each lane sums a stride of C for 8 experts, then the warp reduces.
//   dx:      a warp per row; each lane makes its columns' sums over the E experts.
//   dw:      a thread per column c (blockIdx.y picks 256 columns) over a block's run of rows.
// Memory traffic: forward reads x once (w, E*C*4 bytes, stays in L1); dx reads dlogits and w and
// writes dx; dw reads x and dlogits once. 16-byte accesses in forward and dx when C % 8 == 0 and
// the pointers are 16-byte aligned. Every sum runs in a fixed order: no atomics.
// Test: pytest tests/test_kernels_router_logits.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=router_logits
#include "common.cuh"

constexpr int kGroup = 8;  // experts summed per pass over a row

template <typename TX>
__global__ void router_logits_fwd_kernel(const TX* __restrict__ x, const float* __restrict__ w,
                                         float* __restrict__ logits, int N, int C, int E,
                                         bool vec) {
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const TX* row = x + (size_t)n * C;
    for (int e0 = 0; e0 < E; e0 += kGroup) {
        const int experts = min(kGroup, E - e0);
        float sum[kGroup] = {};
        if (vec) {
            for (int c = lane * 8; c < C; c += 256) {
                float xv[8];
                load8(row + c, xv);
#pragma unroll
                for (int e = 0; e < kGroup; e++) {
                    if (e >= experts) break;
                    float wv[8];
                    load8(w + (size_t)(e0 + e) * C + c, wv);
#pragma unroll
                    for (int q = 0; q < 8; q++) sum[e] += xv[q] * wv[q];
                }
            }
        } else {
            for (int c = lane; c < C; c += 32) {
                const float xv = to_float(row[c]);
#pragma unroll
                for (int e = 0; e < kGroup; e++)
                    if (e < experts) sum[e] += xv * w[(size_t)(e0 + e) * C + c];
            }
        }
#pragma unroll
        for (int e = 0; e < kGroup; e++) {
            const float total = warp_sum(sum[e]);
            if (lane == 0 && e < experts) logits[(size_t)n * E + e0 + e] = total;
        }
    }
}

template <typename TX>
__global__ void router_logits_dx_kernel(const float* __restrict__ dlogits,
                                        const float* __restrict__ w, TX* __restrict__ dx, int N,
                                        int C, int E, bool vec) {
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const float* d = dlogits + (size_t)n * E;
    TX* row = dx + (size_t)n * C;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float sum[8] = {};
            for (int e = 0; e < E; e++) {
                const float de = d[e];
                float wv[8];
                load8(w + (size_t)e * C + c, wv);
#pragma unroll
                for (int q = 0; q < 8; q++) sum[q] += de * wv[q];
            }
            store8(row + c, sum);
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            float sum = 0.f;
            for (int e = 0; e < E; e++) sum += d[e] * w[(size_t)e * C + c];
            row[c] = from_float<TX>(sum);
        }
    }
}

template <typename TX>
__global__ void router_logits_dw_kernel(const float* __restrict__ dlogits,
                                        const TX* __restrict__ x, float* __restrict__ dw_partial,
                                        int N, int C, int E, int rows_per_block) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int first = blockIdx.x * rows_per_block, last = min(N, first + rows_per_block);
    for (int e0 = 0; e0 < E; e0 += kGroup) {
        const int experts = min(kGroup, E - e0);
        float sum[kGroup] = {};
#pragma unroll 4
        for (int n = first; n < last; n++) {
            const float xv = to_float(x[(size_t)n * C + c]);
            const float* d = dlogits + (size_t)n * E + e0;
#pragma unroll
            for (int e = 0; e < kGroup; e++)
                if (e < experts) sum[e] += d[e] * xv;
        }
#pragma unroll
        for (int e = 0; e < kGroup; e++)
            if (e < experts) dw_partial[((size_t)blockIdx.x * E + e0 + e) * C + c] = sum[e];
    }
}

static void check_inputs(const at::Tensor& x, const at::Tensor& w) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
                "router_logits: x must be a contiguous (N, C) CUDA tensor");
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.is_contiguous() &&
                    w.scalar_type() == at::kFloat,
                "router_logits: w must be contiguous float32 (E, C) with C = ", x.size(1));
}

void router_logits_fwd(const at::Tensor& x, const at::Tensor& w, at::Tensor& logits) {
    check_inputs(x, w);
    const int N = x.size(0), C = x.size(1), E = w.size(0), warps = 8;
    if (N == 0 || E == 0) return;
    const at::cuda::OptionalCUDAGuard guard(x.device());
    const bool vec = C % 8 == 0 && aligned16({x, w});
    AVA_DISPATCH(x.scalar_type(), TX, [&] {
        router_logits_fwd_kernel<TX><<<(N + warps - 1) / warps, 32 * warps, 0, stream()>>>(
            ptr<TX>(x), ptr<float>(w), ptr<float>(logits), N, C, E, vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

void router_logits_bwd(const at::Tensor& dlogits, const at::Tensor& x, const at::Tensor& w,
                       at::Tensor& dx, at::Tensor& dw_partial) {
    check_inputs(x, w);
    TORCH_CHECK(dlogits.is_contiguous() && dlogits.scalar_type() == at::kFloat &&
                    dlogits.size(0) == x.size(0) && dlogits.size(1) == w.size(0),
                "router_logits: dlogits must be contiguous float32 (N, E)");
    const int N = x.size(0), C = x.size(1), E = w.size(0), blocks = dw_partial.size(0);
    const int warps = 8, threads = 256;
    if (C == 0 || E == 0) return;
    const at::cuda::OptionalCUDAGuard guard(x.device());
    const bool vec = C % 8 == 0 && aligned16({w, dx});
    AVA_DISPATCH(x.scalar_type(), TX, [&] {
        if (N > 0) {
            router_logits_dx_kernel<TX><<<(N + warps - 1) / warps, 32 * warps, 0, stream()>>>(
                ptr<float>(dlogits), ptr<float>(w), ptr<TX>(dx), N, C, E, vec);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const dim3 grid(blocks, (C + threads - 1) / threads);
        router_logits_dw_kernel<TX><<<grid, threads, 0, stream()>>>(
            ptr<float>(dlogits), ptr<TX>(x), ptr<float>(dw_partial), N, C, E,
            (N + blocks - 1) / blocks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("router_logits_fwd(Tensor x, Tensor w, Tensor(a!) logits) -> ()", &router_logits_fwd);
    m.def("router_logits_bwd(Tensor dlogits, Tensor x, Tensor w, Tensor(a!) dx, "
          "Tensor(b!) dw_partial) -> ()", &router_logits_bwd);
}
