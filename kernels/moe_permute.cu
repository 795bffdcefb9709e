// MoE permute and unpermute + combine: move rows between the token layout (N, C) and the
// expert-sorted layout (M, C) that the grouped expert matmuls run on. M = N*K rows, one per
// (token, expert) assignment a = t*K + k.
//   row_src (M,) int32:          the assignment held by row r, or -1 for an unused row (dropped
//                                assignments).
//   assignment_row (N, K) int32: the row assignment (t, k) occupies, or -1 if it was dropped.
// The two are inverse maps where both are >= 0; they are trusted (built by the caller), not
// bounds-checked here.
// Two kernels, each used twice; each output row is written once by its own group of lanes (a
// warp, or a power-of-two part of one when C is small), so there are no atomics and the results
// are deterministic:
//   gather_rows:  out[r] = g * src[row_src[r] / K], zeros in unused rows,
//                 g = gates.flat[row_src[r]] (or 1):
//                 permute forward (xs from x); unpermute backward (dys from dout, dgates fused in)
//   combine_rows: out[t] = sum over k with assignment_row[t, k] >= 0 of
//                 g * rows[assignment_row[t, k]], g = gates[t, k] (or 1):
//                 unpermute forward (out from ys); permute backward (dx from dxs)
// Rows that no assignment points to are never read, so they may hold garbage (even NaN).
// Memory traffic, U = used rows (<= M), s_ = bytes per element of each tensor, plus
// ~4*(M + 2*N*K) of indices/gates:
//   permute fwd    U*C*s_x read + M*C*s_xs written
//   permute bwd    U*C*s_xs read + N*C*s_x written
//   unpermute fwd  U*C*s_ys read + N*C*4 written
//   unpermute bwd  U*C*(4 + s_ys) read + M*C*s_ys written
// 16-byte accesses when C % 8 == 0 and pointers are 16-byte aligned, else a scalar path.
// The layout itself comes from moe_sort: a stable counting sort of the M assignments by expert
// (expert_idx (N, K) int64, keep (N, K) bool; dropped ones sort last, as expert E) into offsets
// (E,) int32 (each expert's end row), row_src and assignment_row, in two launches where torch
// makes ~12 (argsort alone is several):
//   count_experts: block b histograms its chunk of assignments in shared memory -> counts[b]
//   place_rows:    block b's first row per expert = all blocks' counts of lower experts + lower
//                  blocks' counts of the same expert; then tiles of 1024 assignments in order,
//                  each one's rank among its tile's equals from a warp match and per-warp counts
// Deterministic and stable (token order within an expert), as argsort(stable=True); no atomics
// on global memory. Traffic: 2 reads of the M indices (9 bytes each) and 8 bytes written per
// assignment, plus G*(E+1) counts read by each of the G blocks.
// Test: pytest tests/test_kernels_moe_permute.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=moe_permute (and --op=moe_unpermute)
#include "common.cuh"

constexpr int kThreads = 256;
constexpr int kSortThreads = 1024, kSortWarps = kSortThreads / 32;  // moe_sort's blocks
constexpr int kMaxSortExperts = 256;

// Sum over the `group` lanes that share a row (group: a power of two <= 32). Every lane of the warp
// must call it.
__device__ __forceinline__ float group_sum(float v, int group) {
    for (int offset = group / 2; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// out[r] = g * src[t], a = row_src[r], t = a / K, g = gates[a] (1 without gates); zeros for unused
// rows. With ys (unpermute backward: src = dout, out = dys) it also writes dgates[a] = dot(ys[r],
// dout[t]): the dout row is in registers already, so the dot costs one read of ys[r] instead of a
// second pass over dout and ys. Dropped assignments own no row, so the caller zero-fills dgates.
template <typename Tsrc, typename Tout>
__global__ void gather_rows_kernel(const Tsrc* __restrict__ src, const int* __restrict__ row_src,
                                   const float* __restrict__ gates, const Tout* __restrict__ ys,
                                   Tout* __restrict__ out, float* __restrict__ dgates, int M,
                                   int K, int C, int group, bool vec) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int r = thread / group, lane = thread % group;
    const int a = r < M ? row_src[r] : -1;
    const bool used = a >= 0;
    const Tsrc* s = src + (size_t)(used ? a / K : 0) * C;
    const size_t row = (size_t)r * C;
    const float g = used && gates ? gates[a] : 1.f;
    float dot = 0.f;  // this lane's share of dot(ys[r], src[t])
    if (r < M) {
        if (vec) {
            for (int c = lane * 8; c < C; c += group * 8) {
                float v[8] = {};
                if (used) {
                    load8(s + c, v);
                    if (ys) {
                        float y[8];
                        load8(ys + row + c, y);
#pragma unroll
                        for (int i = 0; i < 8; i++) dot += y[i] * v[i];
                    }
#pragma unroll
                    for (int i = 0; i < 8; i++) v[i] *= g;
                }
                store8(out + row + c, v);
            }
        } else {
            for (int c = lane; c < C; c += group) {
                const float v = used ? to_float(s[c]) : 0.f;
                if (used && ys) dot += to_float(ys[row + c]) * v;
                out[row + c] = from_float<Tout>(g * v);
            }
        }
    }
    if (dgates) {  // the same for the whole grid, so every lane reaches the shuffles
        dot = group_sum(dot, group);
        if (used && lane == 0) dgates[a] = dot;
    }
}

// out[t] = sum over k with r = assignment_row[t, k] >= 0 of g * rows[r], g = gates[t, k] (1 without
// gates).
template <typename Tin, typename Tout>
__global__ void combine_rows_kernel(const Tin* __restrict__ rows,
                                    const int* __restrict__ assignment_row,
                                    const float* __restrict__ gates, Tout* __restrict__ out, int N,
                                    int K, int C, int group, bool vec) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int t = thread / group, lane = thread % group;
    if (t >= N) return;
    const int* row_of = assignment_row + (size_t)t * K;  // (K,) this token's rows
    const float* g = gates ? gates + (size_t)t * K : nullptr;
    Tout* o = out + (size_t)t * C;
    if (vec) {
        for (int c = lane * 8; c < C; c += group * 8) {
            float acc[8] = {};
            for (int k = 0; k < K; k++) {
                const int r = row_of[k];
                if (r < 0) continue;
                const float w = g ? g[k] : 1.f;
                float v[8];
                load8(rows + (size_t)r * C + c, v);
#pragma unroll
                for (int i = 0; i < 8; i++) acc[i] += w * v[i];
            }
            store8(o + c, acc);
        }
    } else {
        for (int c = lane; c < C; c += group) {
            float acc = 0.f;
            for (int k = 0; k < K; k++) {
                const int r = row_of[k];
                if (r >= 0) acc += (g ? g[k] : 1.f) * to_float(rows[(size_t)r * C + c]);
            }
            o[c] = from_float<Tout>(acc);
        }
    }
}

// Lanes per row: the fewest, a power of two up to a warp, that cover a row in one step (C = 512
// with 8-wide
// vectors: a warp; C = 13 scalar: 16 lanes, two rows per warp), so short rows do not leave most
// lanes idle.
static int lanes_per_row(int64_t C, bool vec) {
    const int64_t steps = vec ? C / 8 : C;
    int group = 1;
    while (group < 32 && group < steps) group *= 2;
    return group;
}

static int blocks_for(int64_t rows, int group) {
    TORCH_CHECK(rows < INT_MAX && (rows * group + kThreads - 1) / kThreads <= INT_MAX,
                "too many rows: ", rows);
    return (int)((rows * group + kThreads - 1) / kThreads);
}

static void check_rows(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous(), name,
                " must be a contiguous 2-D CUDA tensor");
}

static void check_index(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kInt && t.is_contiguous(), name,
                " must be a contiguous int32 CUDA tensor");
}

// Undefined gates / ys / dgates (at::Tensor()) mean "none"; see gather_rows_kernel.
static void gather_rows(const at::Tensor& src, const at::Tensor& row_src, int64_t K,
                        const at::Tensor& gates, const at::Tensor& ys, at::Tensor& out,
                        const at::Tensor& dgates) {
    check_rows(src, "src");
    check_rows(out, "out");
    check_index(row_src, "row_src");
    TORCH_CHECK(row_src.numel() == out.size(0) && src.size(1) == out.size(1),
                "gather_rows: shape mismatch");
    if (gates.defined())
        TORCH_CHECK(gates.scalar_type() == at::kFloat && gates.is_contiguous() &&
                        gates.numel() == src.size(0) * K,
                    "gates must be contiguous float32 with N*K elements");
    if (ys.defined()) {
        check_rows(ys, "ys");
        TORCH_CHECK(ys.sizes() == out.sizes() && ys.scalar_type() == out.scalar_type(),
                    "ys must match dys");
        TORCH_CHECK(dgates.scalar_type() == at::kFloat && dgates.numel() == src.size(0) * K,
                    "dgates: N*K float32");
    }
    const at::cuda::OptionalCUDAGuard guard(src.device());
    const int64_t M = out.size(0), C = out.size(1);
    if (M == 0) return;
    const bool vec = C % 8 == 0 && aligned16({src, out}) && (!ys.defined() || aligned16({ys}));
    const int group = lanes_per_row(C, vec);
    AVA_DISPATCH(src.scalar_type(), Tsrc, [&] {
        AVA_DISPATCH(out.scalar_type(), Tout, [&] {
            gather_rows_kernel<Tsrc, Tout><<<blocks_for(M, group), kThreads, 0, stream()>>>(
                ptr<Tsrc>(src), ptr<int>(row_src), gates.defined() ? ptr<float>(gates) : nullptr,
                ys.defined() ? ptr<Tout>(ys) : nullptr, ptr<Tout>(out),
                ys.defined() ? ptr<float>(dgates) : nullptr, M, K, C, group, vec);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
}

static void combine_rows(const at::Tensor& rows, const at::Tensor& assignment_row,
                         const at::Tensor& gates, at::Tensor& out) {
    check_rows(rows, "rows");
    check_rows(out, "out");
    check_index(assignment_row, "assignment_row");
    TORCH_CHECK(assignment_row.dim() == 2 && assignment_row.size(0) == out.size(0) &&
                    rows.size(1) == out.size(1),
                "combine_rows: shape mismatch");
    if (gates.defined())
        TORCH_CHECK(gates.scalar_type() == at::kFloat && gates.is_contiguous() &&
                        gates.sizes() == assignment_row.sizes(),
                    "gates must be float32 shaped like assignment_row");
    const at::cuda::OptionalCUDAGuard guard(out.device());
    const int64_t N = out.size(0), K = assignment_row.size(1), C = out.size(1);
    if (N == 0) return;
    const bool vec = C % 8 == 0 && aligned16({rows, out});
    const int group = lanes_per_row(C, vec);
    AVA_DISPATCH(rows.scalar_type(), Tin, [&] {
        AVA_DISPATCH(out.scalar_type(), Tout, [&] {
            combine_rows_kernel<Tin, Tout><<<blocks_for(N, group), kThreads, 0, stream()>>>(
                ptr<Tin>(rows), ptr<int>(assignment_row),
                gates.defined() ? ptr<float>(gates) : nullptr, ptr<Tout>(out), N, K, C, group, vec);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
}

void moe_permute_fwd(const at::Tensor& x, const at::Tensor& row_src, int64_t K, at::Tensor& xs) {
    gather_rows(x, row_src, K, {}, {}, xs, {});
}

void moe_permute_bwd(const at::Tensor& dxs, const at::Tensor& assignment_row, at::Tensor& dx) {
    combine_rows(dxs, assignment_row, {}, dx);  // undefined gates: all ones
}

void moe_unpermute_fwd(const at::Tensor& ys, const at::Tensor& gates,
                       const at::Tensor& assignment_row, at::Tensor& out) {
    combine_rows(ys, assignment_row, gates, out);
}

void moe_unpermute_bwd(const at::Tensor& dout, const at::Tensor& ys, const at::Tensor& gates,
                       const at::Tensor& row_src, at::Tensor& dys, at::Tensor& dgates) {
    gather_rows(dout, row_src, gates.size(1), gates, ys, dys, dgates);
}

// The expert an assignment sorts under: its own, E when dropped, -1 past the end.
__device__ __forceinline__ int sort_key(const int64_t* expert_idx, const bool* keep, long long a,
                                        long long M, int E) {
    if (a >= M) return -1;
    return keep[a] ? (int)expert_idx[a] : E;
}

// counts[b][e] = assignments of expert e (E: dropped) in block b's chunk [b * chunk, ...).
__global__ void __launch_bounds__(kSortThreads) count_experts_kernel(
        const int64_t* __restrict__ expert_idx, const bool* __restrict__ keep,
        int* __restrict__ counts, long long M, int E, long long chunk) {
    __shared__ int hist[kMaxSortExperts + 1];
    for (int e = threadIdx.x; e <= E; e += kSortThreads) hist[e] = 0;
    __syncthreads();
    const long long begin = blockIdx.x * chunk, end = min(begin + chunk, M);
    for (long long a = begin + threadIdx.x; a < end; a += kSortThreads)
        atomicAdd(&hist[sort_key(expert_idx, keep, a, M, E)], 1);  // shared memory: integers
    __syncthreads();
    for (int e = threadIdx.x; e <= E; e += kSortThreads)
        counts[blockIdx.x * (E + 1) + e] = hist[e];
}

// Writes every assignment's row: row_src[row] = a (or -1 for a dropped one, whose row lies past
// offsets[E - 1]) and assignment_row[a] = row (or -1); block 0 also writes offsets.
__global__ void __launch_bounds__(kSortThreads) place_rows_kernel(
        const int64_t* __restrict__ expert_idx, const bool* __restrict__ keep,
        const int* __restrict__ counts, int* __restrict__ offsets, int* __restrict__ row_src,
        int* __restrict__ assignment_row, long long M, int E, long long chunk) {
    __shared__ int next_row[kMaxSortExperts + 1];            // this block's next free row per key
    __shared__ int warp_counts[kSortWarps][kMaxSortExperts + 1];  // then prefixes over warps
    __shared__ int tile_counts[kMaxSortExperts + 1];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int e = threadIdx.x; e <= E; e += kSortThreads) {
        int before = 0, total = 0;                           // same expert in lower blocks; all
        for (int b = 0; b < gridDim.x; b++) {
            const int c = counts[b * (E + 1) + e];
            before += b < blockIdx.x ? c : 0;
            total += c;
        }
        next_row[e] = before;
        tile_counts[e] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {                                  // totals -> each key's first row
        int start = 0;
        for (int e = 0; e <= E; e++) {
            const int total = tile_counts[e];
            next_row[e] += start;
            start += total;
            if (blockIdx.x == 0 && e < E) offsets[e] = start;
        }
    }
    const long long begin = blockIdx.x * chunk, end = min(begin + chunk, M);
    const unsigned lower_lanes = (1u << lane) - 1;
    for (long long tile = begin; tile < end; tile += kSortThreads) {
        for (int i = threadIdx.x; i < kSortWarps * (E + 1); i += kSortThreads)
            warp_counts[i / (E + 1)][i % (E + 1)] = 0;
        __syncthreads();
        const long long a = tile + threadIdx.x;
        const int key = sort_key(expert_idx, keep, a < end ? a : M, M, E);
        const unsigned same = __match_any_sync(0xffffffff, key);  // lanes with this key
        const int rank_in_warp = __popc(same & lower_lanes);
        if (key >= 0 && rank_in_warp == 0) warp_counts[warp][key] = __popc(same);
        __syncthreads();
        for (int e = threadIdx.x; e <= E; e += kSortThreads) {  // exclusive scan over warps
            int run = 0;
            for (int w = 0; w < kSortWarps; w++) {
                const int c = warp_counts[w][e];
                warp_counts[w][e] = run;
                run += c;
            }
            tile_counts[e] = run;
        }
        __syncthreads();
        if (key >= 0) {
            const int row = next_row[key] + warp_counts[warp][key] + rank_in_warp;
            const bool kept = key < E;
            row_src[row] = kept ? (int)a : -1;
            assignment_row[a] = kept ? row : -1;
        }
        __syncthreads();
        for (int e = threadIdx.x; e <= E; e += kSortThreads) next_row[e] += tile_counts[e];
        // the next tile's zeroing waits at its first __syncthreads for these updates' readers
    }
}

void moe_sort(const at::Tensor& expert_idx, const at::Tensor& keep, at::Tensor& offsets,
              at::Tensor& row_src, at::Tensor& assignment_row) {
    TORCH_CHECK(expert_idx.is_cuda() && expert_idx.dim() == 2 && expert_idx.is_contiguous() &&
                    expert_idx.scalar_type() == at::kLong,
                "expert_idx must be a contiguous (N, K) int64 CUDA tensor");
    TORCH_CHECK(keep.device() == expert_idx.device() && keep.sizes() == expert_idx.sizes() &&
                    keep.is_contiguous() && keep.scalar_type() == at::kBool,
                "keep must be a contiguous bool tensor shaped like expert_idx");
    check_index(offsets, "offsets");
    check_index(row_src, "row_src");
    check_index(assignment_row, "assignment_row");
    const int64_t M = expert_idx.numel(), E = offsets.numel();
    TORCH_CHECK(row_src.numel() == M && assignment_row.numel() == M, "moe_sort: shape mismatch");
    TORCH_CHECK(1 <= E && E <= kMaxSortExperts, "moe_sort supports 1 to ", kMaxSortExperts,
                " experts, got ", E);
    TORCH_CHECK(M < INT_MAX, "moe_sort: too many assignments: ", M);
    const at::cuda::OptionalCUDAGuard guard(expert_idx.device());
    if (M == 0) {
        offsets.zero_();
        return;
    }
    // chunks of whole tiles, about two blocks per SM, so each block's scan over counts is short
    const int64_t tiles = (M + kSortThreads - 1) / kSortThreads;
    const int64_t tiles_per_block = (tiles + 2 * num_sms() - 1) / (2 * num_sms());
    const int64_t chunk = tiles_per_block * kSortThreads;
    const int grid = (int)((M + chunk - 1) / chunk);
    at::Tensor counts = at::empty({grid, E + 1}, offsets.options());
    count_experts_kernel<<<grid, kSortThreads, 0, stream()>>>(
        ptr<int64_t>(expert_idx), ptr<bool>(keep), ptr<int>(counts), M, (int)E, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    place_rows_kernel<<<grid, kSortThreads, 0, stream()>>>(
        ptr<int64_t>(expert_idx), ptr<bool>(keep), ptr<int>(counts), ptr<int>(offsets),
        ptr<int>(row_src), ptr<int>(assignment_row), M, (int)E, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("moe_permute_fwd(Tensor x, Tensor row_src, int K, Tensor(a!) xs) -> ()",
          &moe_permute_fwd);
    m.def("moe_permute_bwd(Tensor dxs, Tensor assignment_row, Tensor(a!) dx) -> ()",
          &moe_permute_bwd);
    m.def("moe_unpermute_fwd(Tensor ys, Tensor gates, Tensor assignment_row, Tensor(a!) out) -> ()",
          &moe_unpermute_fwd);
    m.def("moe_unpermute_bwd(Tensor dout, Tensor ys, Tensor gates, Tensor row_src, Tensor(a!) dys, "
          "Tensor(b!) dgates) -> ()", &moe_unpermute_bwd);
    m.def("moe_sort(Tensor expert_idx, Tensor keep, Tensor(a!) offsets, Tensor(b!) row_src, "
          "Tensor(c!) assignment_row) -> ()", &moe_sort);
}
