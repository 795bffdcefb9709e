// Sinkhorn-Knopp balanced top-k routing in one launch: expert_idx = top-k over j of the balanced
// log matrix logits[i, j] + u[i] + v[j] after n_iters rounds of (rows sum to 1, columns sum to
// N/E), plus bias[j]. Only the E column scalings v need global state: u[i] is constant along row
// i, so it changes no row's top-k, and each round is
//   u[i] = -logsumexp_j(logits[i, j] + v[j])          (per row, recomputed, row-max shifted)
//   v[j] += log(N/E) - log(sum_i exp(logits[i, j] + v[j] + u[i]))   (each term <= 1: fp32-safe)
// Shapes: logits (N, E) fp32 contiguous, 1 <= E <= 64; bias (E,) fp32; expert_idx (N, K) int64,
// 1 <= K <= E; partials (2, G, E) fp32 scratch, G = grid blocks.
// Work split: a cooperative grid of G <= #SMs blocks (one block per SM: every block re-reads all
// G*E partials each round, so fewer, larger blocks keep that cheap). A row belongs to a group of
// `group` = min(32, pow2 >= E) lanes, lane g holding columns g and g + 32. Per round each block
// sums its rows' column masses (shuffles, then its warps in a fixed order), writes them to
// partials[round % 2][block], grid.sync(), then every block sums the G partials in the same fixed
// order and updates its own copy of v in shared memory: no float atomics, so the result is
// deterministic and identical in every block. Double-buffered partials need one grid.sync() per
// round.
// Last, top-k of logits + v + bias, K rounds of a group argmax (ties -> lower index, NaN ranks
// highest, as torch.topk).
// Memory traffic per call: (n_iters + 1) * N*E*4 read (rounds after the first hit L2 when N*E*4
// fits in it, 1 MiB at N = 32768, E = 8) + N*K*8 written + n_iters * G*E*4 * (1 + G) of
// partials (written once, read by every block).
// Test: pytest tests/test_kernels_sinkhorn.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=sinkhorn_topk
#include <cooperative_groups.h>

#include <cfloat>
#include <climits>

#include "common.cuh"

constexpr int kThreads = 1024, kWarps = kThreads / 32, kMaxExperts = 64;

// Reductions over the `group` lanes of one row (group: a power of two <= 32). Every lane of the
// warp must call them.
__device__ __forceinline__ float group_sum(float v, int group) {
    for (int offset = group / 2; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}
__device__ __forceinline__ float group_max(float v, int group) {
    for (int offset = group / 2; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// Replaces (val, idx) by (other_val, other_idx) when the other ranks first: larger value, then
// lower index.
__device__ __forceinline__ void keep_better(float& val, int& idx, float other_val, int other_idx) {
    if (other_val > val || (other_val == val && other_idx < idx)) {
        val = other_val;
        idx = other_idx;
    }
}

__global__ void __launch_bounds__(kThreads) sinkhorn_topk_kernel(
        const float* __restrict__ logits, const float* __restrict__ bias,
        int64_t* __restrict__ expert_idx, float* __restrict__ partials, int N, int E, int K,
        int n_iters, int group, float log_target) {
    __shared__ float v[kMaxExperts];  // column scalings (log space), the same in every block
    __shared__ float warp_sums[kWarps][kMaxExperts];  // per-warp column sums, then of partials
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane % group;
    const int rows_per_warp = 32 / group;
    const int col[2] = {g, g + 32};   // this lane's columns; col 1 only exists when E > 32
    // warp-uniform row loop (all lanes shuffle); this lane's row is base + lane / group
    const long long first = ((long long)blockIdx.x * kWarps + warp) * rows_per_warp + lane / group;
    const long long stride = (long long)gridDim.x * kWarps * rows_per_warp;
    const long long rounded_N = (N + rows_per_warp - 1) / rows_per_warp * rows_per_warp;
    for (int j = threadIdx.x; j < E; j += kThreads) v[j] = 0.f;
    __syncthreads();

    for (int it = 0; it < n_iters; it++) {
        float* round_partials = partials + (size_t)(it % 2) * gridDim.x * E;
        float mass[2] = {0.f, 0.f};                  // this lane's share of its columns' sums
        for (long long row = first; row < rounded_N; row += stride) {
            bool valid[2];
            float x[2];                              // logits + v
#pragma unroll
            for (int c = 0; c < 2; c++) {
                valid[c] = row < N && col[c] < E;
                x[c] = valid[c] ? logits[row * E + col[c]] + v[col[c]] : -INFINITY;
            }
            const float row_max = group_max(fmaxf(x[0], x[1]), group);
            float e[2];
#pragma unroll
            for (int c = 0; c < 2; c++) e[c] = valid[c] ? expf(x[c] - row_max) : 0.f;
            // the sum is >= 1 on real rows: their max term is exp(0)
            const float inv_sum = 1.f / group_sum(e[0] + e[1], group);
#pragma unroll
            for (int c = 0; c < 2; c++) mass[c] += valid[c] ? e[c] * inv_sum : 0.f;
        }
#pragma unroll
        for (int c = 0; c < 2; c++) {  // sum the warp's groups (lanes g, g + group, ...: col[c])
            for (int offset = 16; offset >= group; offset >>= 1)
                mass[c] += __shfl_xor_sync(0xffffffff, mass[c], offset);
            if (lane < group && col[c] < E) warp_sums[warp][col[c]] = mass[c];
        }
        __syncthreads();
        for (int j = threadIdx.x; j < E; j += kThreads) {
            float block_sum = 0.f;
            for (int w = 0; w < kWarps; w++) block_sum += warp_sums[w][j];
            round_partials[(size_t)blockIdx.x * E + j] = block_sum;
        }
        // all partials written; the next round writes the other buffer, which every block has
        // finished reading by now
        grid.sync();
        // warp w sums blocks w, w + kWarps, ... in a fixed order (__ldcg reads L2, where the other
        // SMs' writes are)
        for (int j = lane; j < E; j += 32) {
            float sum = 0.f;
            for (int b = warp; b < gridDim.x; b += kWarps)
                sum += __ldcg(&round_partials[(size_t)b * E + j]);
            warp_sums[warp][j] = sum;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < E; j += kThreads) {
            float column_sum = 0.f;
            for (int w = 0; w < kWarps; w++) column_sum += warp_sums[w][j];
            // FLT_MIN: a column whose every term underflowed still gets a large finite boost,
            // not log(0)
            v[j] += log_target - logf(fmaxf(column_sum, FLT_MIN));
        }
        __syncthreads();
    }
    // the bias comes after the balancing, which would cancel it
    for (int j = threadIdx.x; j < E; j += kThreads) v[j] += bias[j];
    __syncthreads();

    for (long long row = first; row < rounded_N; row += stride) {
        float y[2];  // logits + v + bias; -inf where there is no column
        bool taken[2] = {false, false};
#pragma unroll
        for (int c = 0; c < 2; c++) {
            y[c] = row < N && col[c] < E ? logits[row * E + col[c]] + v[col[c]] : -INFINITY;
            if (isnan(y[c])) y[c] = INFINITY;  // a diverged run still gets K distinct, real experts
        }
        for (int k = 0; k < K; k++) {
            float best = -INFINITY;
            int best_idx = INT_MAX;  // loses to every real column, even one at -inf
#pragma unroll
            for (int c = 0; c < 2; c++) {  // branch-free: every lane reaches the shuffles together
                const bool open = !taken[c] && col[c] < E;
                keep_better(best, best_idx, open ? y[c] : -INFINITY, open ? col[c] : INT_MAX);
            }
            for (int offset = group / 2; offset > 0; offset >>= 1)
                keep_better(best, best_idx, __shfl_xor_sync(0xffffffff, best, offset),
                            __shfl_xor_sync(0xffffffff, best_idx, offset));
#pragma unroll
            for (int c = 0; c < 2; c++) taken[c] |= col[c] == best_idx;
            if (g == 0 && row < N) expert_idx[row * K + k] = best_idx;
        }
    }
}

void sinkhorn_topk(const at::Tensor& logits, const at::Tensor& bias, int64_t n_iters,
                   at::Tensor& expert_idx) {
    TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous() &&
                    logits.scalar_type() == at::kFloat,
                "logits must be a contiguous 2-D float32 CUDA tensor");
    TORCH_CHECK(bias.device() == logits.device() && bias.dim() == 1 &&
                    bias.size(0) == logits.size(1) && bias.is_contiguous() &&
                    bias.scalar_type() == at::kFloat,
                "bias must be a contiguous (E,) float32 tensor on logits' device");
    TORCH_CHECK(expert_idx.device() == logits.device() && expert_idx.dim() == 2 &&
                    expert_idx.is_contiguous() && expert_idx.scalar_type() == at::kLong &&
                    expert_idx.size(0) == logits.size(0),
                "expert_idx must be a contiguous (N, K) int64 tensor on logits' device");
    const int64_t N = logits.size(0), E = logits.size(1), K = expert_idx.size(1);
    TORCH_CHECK(1 <= E && E <= kMaxExperts, "sinkhorn_topk supports 1 to ", kMaxExperts,
                " experts, got ", E);
    TORCH_CHECK(1 <= K && K <= E, "k must be in [1, ", E, "], got ", K);
    TORCH_CHECK(0 <= n_iters && n_iters <= INT_MAX && N < INT_MAX,
                "n_iters must be >= 0 and N < 2^31");
    const at::cuda::OptionalCUDAGuard guard(logits.device());
    if (N == 0) return;
    int device, cooperative, blocks_per_sm;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
    TORCH_CHECK(cooperative, "sinkhorn_topk needs a GPU that supports cooperative launches");
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks_per_sm, sinkhorn_topk_kernel, kThreads, 0));
    TORCH_CHECK(blocks_per_sm >= 1, "sinkhorn_topk_kernel cannot fit one block per SM");
    int group = 1;
    while (group < std::min<int64_t>(E, 32)) group *= 2;
    const int64_t rows_per_block = kWarps * (32 / group);
    // at most one block per SM: every block must be co-resident for grid.sync()
    int grid = (int)std::min<int64_t>((N + rows_per_block - 1) / rows_per_block, num_sms());
    at::Tensor partials = at::empty({2, grid, E}, logits.options());
    const float* logits_ptr = ptr<float>(logits);
    const float* bias_ptr = ptr<float>(bias);
    int64_t* idx_ptr = ptr<int64_t>(expert_idx);
    float* partials_ptr = ptr<float>(partials);
    int n = (int)N, e = (int)E, k = (int)K, iters = (int)n_iters;
    float log_target = (float)std::log((double)N / E);
    void* args[] = {&logits_ptr, &bias_ptr, &idx_ptr, &partials_ptr, &n,
                    &e, &k, &iters, &group, &log_target};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel((const void*)sinkhorn_topk_kernel, grid, kThreads,
                                               args, 0, stream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("sinkhorn_topk(Tensor logits, Tensor bias, int n_iters, Tensor(a!) expert_idx) -> ()",
          &sinkhorn_topk);
}
