// Cross-entropy over the vocabulary, forward and backward, straight from the (bf16) logits: no fp32
// copy of them.
//   forward:  lse = log sum_j exp(x_j),  loss_row = lse - x_target
//             (one pass: online max and sum-exp)
//   backward: dx_j = dloss_row * (exp(x_j - lse) - [j == target])
//             (one pass: read x, write dx)
// Rows whose target is -1 are ignored: loss_row = 0 and dx = 0 (the forward still writes their
// lse). A target outside [0, V) that is not -1 cannot be checked on the host without a sync: its
// row gets loss NaN and gradient NaN, so the mean loss turns NaN and the bad batch shows (a device
// assert would kill the process).
// Shapes: logits (N, V) fp32 or bf16 contiguous; targets (N,) int64; loss_rows, lse, dloss_rows
// (N,) fp32; dlogits (N, V) like logits.
// Work split: one row per group of G threads, G = 256 (a CTA) for V > 4096, else G = 32 (a warp; 8
// rows per CTA). Each thread takes 32 elements per step: four vectors of 8 (16-byte accesses) when
// V % 8 == 0 and pointers are 16-byte aligned, else 32 single elements; all loads of a step are
// issued before any math, to keep many bytes in flight.
// Memory traffic per call: forward N*V*sizeof(dtype) + 16*N bytes; backward 2*N*V*sizeof(dtype) +
// 16*N bytes (ignored rows only write). exp uses __expf: its argument is x - max <= 0 (or x - lse),
// where it is accurate.
// Test: pytest tests/test_kernels_cross_entropy.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=cross_entropy
#include "common.cuh"

#include <type_traits>

constexpr int kBlock = 256;   // threads per CTA
constexpr int kPerStep = 32;  // elements each thread handles per step

// W consecutive elements <-> W floats: 16-byte accesses for W = 8, single elements for W = 1.
template <int W, typename T> __device__ __forceinline__ void load_w(const T* p, float (&v)[W]) {
    if constexpr (W == 8) load8(p, v); else v[0] = to_float(*p);
}
template <int W, typename T> __device__ __forceinline__ void store_w(T* p, const float (&v)[W]) {
    if constexpr (W == 8) store8(p, v); else *p = from_float<T>(v[0]);
}

// Max (kMax) or sum of v over the G threads of a row group: warp shuffles, then shared memory
// across warps.
template <int G, bool kMax> __device__ __forceinline__ float group_reduce(float v) {
    v = kMax ? warp_max(v) : warp_sum(v);
    if constexpr (G > 32) {
        __shared__ float partial[G / 32];
        __syncthreads();  // an earlier call's readers are done with partial
        if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
        __syncthreads();
        v = threadIdx.x % 32 < G / 32 ? partial[threadIdx.x % 32] : (kMax ? -INFINITY : 0.f);
        v = kMax ? warp_max(v) : warp_sum(v);
    }
    return v;
}

// exp offsets must stay finite: a max of -inf (nothing but -inf seen yet) shifts by 0, so exp(-inf)
// = 0, not NaN.
__device__ __forceinline__ float finite_or_zero(float m) { return m == -INFINITY ? 0.f : m; }

template <typename T, int W, int G>
__global__ void __launch_bounds__(kBlock) cross_entropy_fwd_kernel(const T* __restrict__ logits,
        const int64_t* __restrict__ targets, float* __restrict__ loss_rows, float* __restrict__ lse,
        int N, int V) {
    constexpr int U = kPerStep / W;  // vectors per thread per step
    const int row = blockIdx.x * (kBlock / G) + threadIdx.x / G, tid = threadIdx.x % G;
    if (row >= N) return;  // only when G = 32: a whole warp leaves, and warps never sync together
    const T* x = logits + (size_t)row * V;
    float m = -INFINITY, s = 0.f;  // this thread's running max and sum of exp(x - m)
    for (int c = tid * W; c < V; c += G * W * U) {
        float v[U][W];
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c + u * G * W < V) load_w<W>(x + c + u * G * W, v[u]);
            else for (int i = 0; i < W; i++) v[u][i] = -INFINITY;
        }
        float step_max = -INFINITY;
#pragma unroll
        for (int u = 0; u < U; u++)
            for (int i = 0; i < W; i++)
                step_max = fmaxf(step_max, v[u][i]);  // fmaxf skips NaN; the sum keeps it
        const float m_new = fmaxf(m, step_max), shift = finite_or_zero(m_new);
        s *= __expf(m - shift);  // rescale the old sum to the new max
#pragma unroll
        for (int u = 0; u < U; u++)
            for (int i = 0; i < W; i++) s += __expf(v[u][i] - shift);
        m = m_new;
    }
    const float row_max = group_reduce<G, true>(m), shift = finite_or_zero(row_max);
    const float row_sum = group_reduce<G, false>(s * __expf(m - shift));
    if (tid == 0) {
        const float row_lse = shift + logf(row_sum);  // all -inf: -inf, and loss NaN, as in PyTorch
        const int64_t t = targets[row];
        lse[row] = row_lse;
        loss_rows[row] = t == -1 ? 0.f : (t >= 0 && t < V) ? row_lse - to_float(x[t]) : NAN;
    }
}

template <typename T, int W, int G>
__global__ void __launch_bounds__(kBlock) cross_entropy_bwd_kernel(
        const float* __restrict__ dloss_rows, const T* __restrict__ logits,
        const int64_t* __restrict__ targets, const float* __restrict__ lse, T* __restrict__ dlogits,
        int N, int V) {
    constexpr int U = kPerStep / W;
    const int row = blockIdx.x * (kBlock / G) + threadIdx.x / G, tid = threadIdx.x % G;
    if (row >= N) return;
    const T* x = logits + (size_t)row * V;
    T* dx = dlogits + (size_t)row * V;
    const int64_t t = targets[row];
    if (t == -1) {  // ignored row: zeros, without reading its logits
        const float zeros[W] = {};
        for (int c = tid * W; c < V; c += G * W) store_w<W>(dx + c, zeros);
        return;
    }
    const float g = t >= 0 && t < V ? dloss_rows[row] : NAN, row_lse = lse[row];
    for (int c = tid * W; c < V; c += G * W * U) {
        float v[U][W];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * G * W < V) load_w<W>(x + c + u * G * W, v[u]);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c0 = c + u * G * W;
            if (c0 >= V) continue;
            for (int i = 0; i < W; i++)
                v[u][i] = g * (__expf(v[u][i] - row_lse) - (c0 + i == t ? 1.f : 0.f));
            store_w<W>(dx + c0, v[u]);
        }
    }
}

// Calls launch(W, G) as compile-time constants (std::integral_constant) for this row length and
// layout.
template <typename F> static void with_row_layout(int V, bool vec, F&& launch) {
    using W8 = std::integral_constant<int, 8>;
    using W1 = std::integral_constant<int, 1>;
    using Warp = std::integral_constant<int, 32>;
    using Cta = std::integral_constant<int, kBlock>;
    if (vec && V <= 4096) launch(W8{}, Warp{});
    else if (vec) launch(W8{}, Cta{});
    else if (V <= 4096) launch(W1{}, Warp{});
    else launch(W1{}, Cta{});
}

static void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
    TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous() &&
                logits.size(1) > 0, "logits must be a contiguous (N, V) CUDA tensor with V > 0");
    TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() &&
                targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                targets.device() == logits.device(),
                "targets must be a contiguous (N,) int64 tensor on logits' device");
}

void cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& loss_rows,
                       at::Tensor& lse) {
    check_inputs(logits, targets);
    TORCH_CHECK(loss_rows.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat &&
                loss_rows.numel() == logits.size(0) && lse.numel() == logits.size(0),
                "outputs must be (N,) float32");
    const at::cuda::OptionalCUDAGuard guard(logits.device());
    const int N = logits.size(0), V = logits.size(1);
    if (N == 0) return;
    AVA_DISPATCH(logits.scalar_type(), T, [&] {
        with_row_layout(V, V % 8 == 0 && aligned16({logits}), [&](auto w, auto g) {
            constexpr int W = decltype(w)::value, G = decltype(g)::value;
            const int rows_per_block = kBlock / G;
            cross_entropy_fwd_kernel<T, W, G>
                <<<(N + rows_per_block - 1) / rows_per_block, kBlock, 0, stream()>>>(
                    ptr<T>(logits), ptr<int64_t>(targets), ptr<float>(loss_rows),
                    ptr<float>(lse), N, V);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
}

void cross_entropy_bwd(const at::Tensor& dloss_rows, const at::Tensor& logits,
                       const at::Tensor& targets, const at::Tensor& lse, at::Tensor& dlogits) {
    check_inputs(logits, targets);
    TORCH_CHECK(dloss_rows.scalar_type() == at::kFloat && dloss_rows.is_contiguous() &&
                lse.is_contiguous() && lse.scalar_type() == at::kFloat &&
                dloss_rows.numel() == logits.size(0) && lse.numel() == logits.size(0),
                "dloss_rows and lse must be contiguous (N,) float32");
    TORCH_CHECK(dlogits.sizes() == logits.sizes() &&
                dlogits.scalar_type() == logits.scalar_type() && dlogits.is_contiguous(),
                "dlogits must be a contiguous tensor like logits");
    const at::cuda::OptionalCUDAGuard guard(logits.device());
    const int N = logits.size(0), V = logits.size(1);
    if (N == 0) return;
    AVA_DISPATCH(logits.scalar_type(), T, [&] {
        with_row_layout(V, V % 8 == 0 && aligned16({logits, dlogits}), [&](auto w, auto g) {
            constexpr int W = decltype(w)::value, G = decltype(g)::value;
            const int rows_per_block = kBlock / G;
            cross_entropy_bwd_kernel<T, W, G>
                <<<(N + rows_per_block - 1) / rows_per_block, kBlock, 0, stream()>>>(
                    ptr<float>(dloss_rows), ptr<T>(logits), ptr<int64_t>(targets),
                    ptr<float>(lse), ptr<T>(dlogits), N, V);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
}

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("cross_entropy_fwd(Tensor logits, Tensor targets, Tensor(a!) loss_rows, Tensor(b!) lse) "
          "-> ()", &cross_entropy_fwd);
    m.def("cross_entropy_bwd(Tensor dloss_rows, Tensor logits, Tensor targets, Tensor lse, "
          "Tensor(a!) dlogits) -> ()", &cross_entropy_bwd);
}
