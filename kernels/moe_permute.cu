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
// Test: pytest tests/test_kernels_moe_permute.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=moe_permute (and --op=moe_unpermute)
#include "common.cuh"

constexpr int kThreads = 256;

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

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("moe_permute_fwd(Tensor x, Tensor row_src, int K, Tensor(a!) xs) -> ()",
          &moe_permute_fwd);
    m.def("moe_permute_bwd(Tensor dxs, Tensor assignment_row, Tensor(a!) dx) -> ()",
          &moe_permute_bwd);
    m.def("moe_unpermute_fwd(Tensor ys, Tensor gates, Tensor assignment_row, Tensor(a!) out) -> ()",
          &moe_unpermute_fwd);
    m.def("moe_unpermute_bwd(Tensor dout, Tensor ys, Tensor gates, Tensor row_src, Tensor(a!) dys, "
          "Tensor(b!) dgates) -> ()", &moe_unpermute_bwd);
}
