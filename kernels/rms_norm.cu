// RMSNorm (Zhang & Sennrich 2019), forward and backward, one warp per row.
//   forward:  y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)
//   backward: dx = rstd * w * dy - rstd^3 / C * x * sum(w * dy * x)
//             dw = sum over rows of dy * x * rstd
// Shapes: x (N, C) fp32 or bf16 (Ava's residual stream is fp32); w (C,) fp32 (bf16 too in
// forward: a bf16 model's decode step then makes no cast of it); y (N, C) in its own
// dtype (bf16 under autocast, so the matmul after the norm needs no cast pass); rstd (N,) fp32,
// saved for backward; dy (N, C) fp32 or bf16; dx like x; dw_partial (blocks, C) fp32, summed over
// blocks by the caller.
// Memory traffic: forward reads x once (a second read of the row hits L1) and writes y; backward
// reads dy, x and writes dx. 16-byte accesses when C % 8 == 0 and pointers are 16-byte aligned,
// else a scalar path.
// Test: pytest tests/test_kernels_rms_norm.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=rms_norm
#include "common.cuh"

template <typename Tx, typename Tw, typename Ty>
__global__ void rms_norm_fwd_kernel(const Tx* __restrict__ x, const Tw* __restrict__ w,
                                    Ty* __restrict__ y, float* __restrict__ rstd, int rows, int C,
                                    float eps, bool vec) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const Tx* xr = x + (size_t)row * C;
    Ty* yr = y + (size_t)row * C;
    float sum_sq = 0.f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8];
            load8(xr + c, v);
#pragma unroll
            for (int i = 0; i < 8; i++) sum_sq += v[i] * v[i];
        }
    } else {
        for (int c = lane; c < C; c += 32) { float v = to_float(xr[c]); sum_sq += v * v; }
    }
    const float r = rsqrtf(warp_sum(sum_sq) / C + eps);
    if (lane == 0) rstd[row] = r;
    scale_row(xr, w, yr, C, r, vec);
}

template <typename Tx, typename Tg>
__global__ void rms_norm_bwd_kernel(const Tg* __restrict__ dy, const Tx* __restrict__ x,
                                    const float* __restrict__ w, const float* __restrict__ rstd,
                                    Tx* __restrict__ dx, float* __restrict__ dw_partial, int rows,
                                    int C, bool vec) {
    // dw: each warp sums its rows into its own shared-memory row, and each lane always owns the
    // same columns, so no two threads ever add to one address (no atomics); the warps' rows are
    // summed once at the end.
    extern __shared__ float dw_warps[];  // (warps, C)
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    float* dw_warp = dw_warps + (threadIdx.x / 32) * C;
    for (int c = threadIdx.x; c < warps * C; c += blockDim.x) dw_warps[c] = 0.f;
    __syncthreads();
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < rows; row += gridDim.x * warps) {
        const Tx* xr = x + (size_t)row * C;
        const Tg* gr = dy + (size_t)row * C;
        Tx* dxr = dx + (size_t)row * C;
        const float r = rstd[row];
        float dot = 0.f;  // sum over the row of w * dy * x
        if (vec) {
            for (int c = lane * 8; c < C; c += 256) {
                float xv[8], gv[8], wv[8];
                load8(xr + c, xv); load8(gr + c, gv); load8(w + c, wv);
#pragma unroll
                for (int i = 0; i < 8; i++) dot += wv[i] * gv[i] * xv[i];
            }
        } else {
            for (int c = lane; c < C; c += 32) dot += w[c] * to_float(gr[c]) * to_float(xr[c]);
        }
        const float k = r * r * r * warp_sum(dot) / C;
        if (vec) {
            for (int c = lane * 8; c < C; c += 256) {
                float xv[8], gv[8], wv[8], out[8];
                load8(xr + c, xv); load8(gr + c, gv); load8(w + c, wv);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    out[i] = r * wv[i] * gv[i] - k * xv[i];
                    xv[i] = gv[i] * xv[i] * r;  // this row's dw terms
                }
                store8(dxr + c, out);
                float dw[8];
                // 16-byte shared-memory accesses: a warp covers 1 KB without bank conflicts
                load8(dw_warp + c, dw);
#pragma unroll
                for (int i = 0; i < 8; i++) dw[i] += xv[i];
                store8(dw_warp + c, dw);
            }
        } else {
            for (int c = lane; c < C; c += 32) {
                float xv = to_float(xr[c]), gv = to_float(gr[c]);
                dxr[c] = from_float<Tx>(r * w[c] * gv - k * xv);
                dw_warp[c] += gv * xv * r;
            }
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float sum = 0.f;
        for (int w = 0; w < warps; w++) sum += dw_warps[w * C + c];
        dw_partial[(size_t)blockIdx.x * C + c] = sum;
    }
}

static void check_rows(const at::Tensor& t, const at::Tensor& w, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous(), name,
                " must be a contiguous 2-D CUDA tensor");
    TORCH_CHECK(t.size(1) == w.size(0), name, " has ", t.size(1), " columns but weight has ",
                w.size(0));
}

void rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, at::Tensor& rstd,
                  double eps) {
    check_rows(x, w, "x");
    check_rows(y, w, "y");
    TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
    const at::cuda::OptionalCUDAGuard guard(x.device());
    const int rows = x.size(0), C = x.size(1), threads = 256;
    if (rows == 0) return;
    const bool vec = C % 8 == 0 && aligned16({x, w, y});
    AVA_DISPATCH(x.scalar_type(), Tx, [&] {
        AVA_DISPATCH(w.scalar_type(), Tw, [&] {
            AVA_DISPATCH(y.scalar_type(), Ty, [&] {
                rms_norm_fwd_kernel<Tx, Tw, Ty><<<(rows + 7) / 8, threads, 0, stream()>>>(
                    ptr<Tx>(x), ptr<Tw>(w), ptr<Ty>(y), ptr<float>(rstd), rows, C, (float)eps,
                    vec);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
        });
    });
}

void rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dw_partial) {
    check_rows(dy, w, "dy");
    check_rows(x, w, "x");
    const at::cuda::OptionalCUDAGuard guard(x.device());
    const int rows = x.size(0), C = x.size(1), blocks = dw_partial.size(0);
    TORCH_CHECK(C * sizeof(float) <= 48 * 1024, "rms_norm backward supports C <= 12288");
    // shared memory holds (warps, C) fp32
    const int warps = std::min<int>(8, 48 * 1024 / (C * sizeof(float))), threads = 32 * warps;
    const bool vec = C % 8 == 0 && aligned16({dy, x, w, dx});
    AVA_DISPATCH(x.scalar_type(), Tx, [&] {
        AVA_DISPATCH(dy.scalar_type(), Tg, [&] {
            rms_norm_bwd_kernel<Tx, Tg><<<blocks, threads, warps * C * sizeof(float), stream()>>>(
                ptr<Tg>(dy), ptr<Tx>(x), ptr<float>(w), ptr<float>(rstd), ptr<Tx>(dx),
                ptr<float>(dw_partial), rows, C, vec);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
}

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("rms_norm_fwd(Tensor x, Tensor weight, Tensor(a!) y, Tensor(b!) rstd, float eps) -> ()",
          &rms_norm_fwd);
    m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor(a!) dx, "
          "Tensor(b!) dw_partial) -> ()", &rms_norm_bwd);
}
