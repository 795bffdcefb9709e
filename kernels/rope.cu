// Attention's qkv split + rotary position embedding (RoPE, Su et al. 2021), forward and backward,
// in one pass; and for a decode step, the attention's whole input side (RMSNorm, the qkv
// projection and RoPE) in one launch: norm_qkv_rope, below.
//   forward:  q, k, v = split of qkv into heads;
//             (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) on q and k
//   backward: the inverse rotation (angle -theta) on dq and dk,
//             (g1, g2) -> (g1 cos + g2 sin, -g1 sin + g2 cos);
//             dv copied; all three written back into one dqkv in qkv's packed layout
// 'Half-split' pairing: channel i of a head pairs with channel i + D/2 (x1 = first D/2 channels,
// x2 = the rest).
// Shapes: qkv (B, T, 3C) = (B, T, 3, H, D) contiguous, fp32 or bf16; q, k, v (B, H, T, D)
// contiguous, same dtype (the layout flash attention reads); cos, sin (T, D/2) fp32, already for
// the right positions (KV-cache offsets).
// Work split: one thread per unit of W consecutive pairs of one head row, W = 8 when D/2 % 8 == 0
// and every pointer is 16-byte aligned (bf16: two 16-byte loads and two 16-byte stores per unit),
// else W = 1 (any even D). Units are numbered in qkv's order, so reads (forward) and writes
// (backward) of the packed tensor are fully coalesced, and each head row of D channels is one
// contiguous run on the other side.
// Memory traffic per call: 2 * 3*B*T*C * sizeof(dtype) bytes (read once, write once) +
// 2 * T*D/2 * 4 bytes of cos/sin, which every batch row and head re-reads from cache.
// Test: pytest tests/test_kernels_rope.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=qkv_rope (and --op=norm_qkv_rope)

#include "common.cuh"

// W consecutive elements <-> W floats: 16-byte accesses for W = 8, single elements for W = 1.
template <int W, typename T> __device__ __forceinline__ void load_w(const T* p, float (&v)[W]) {
    if constexpr (W == 8) load8(p, v); else v[0] = to_float(*p);
}
template <int W, typename T> __device__ __forceinline__ void store_w(T* p, const float (&v)[W]) {
    if constexpr (W == 8) store8(p, v); else *p = from_float<T>(v[0]);
}

// kBackward false: packed qkv -> rotated q, k and copied v.
// kBackward true: dq, dk, dv -> packed dqkv.
template <typename T, int W, bool kBackward>
__global__ void qkv_rope_kernel(T* __restrict__ packed, T* __restrict__ q, T* __restrict__ k,
                                T* __restrict__ v, const float* __restrict__ cos,
                                const float* __restrict__ sin, int64_t units, int T_, int H,
                                int D) {
    // 64-bit: qkv may hold more than 2^31 elements
    const int64_t unit = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (unit >= units) return;
    const int half = D / 2, units_per_row = half / W;
    const int j = (unit % units_per_row) * W;  // first pair of this unit, in [0, D/2)
    int64_t row = unit / units_per_row;        // (b, t, s, h) in qkv's order; s = 0, 1, 2: q, k, v
    const int h = row % H;
    row /= H;
    const int s = row % 3, t = (row / 3) % T_;
    const int64_t bt = row / 3, b = bt / T_;
    T* packed_row = packed + (size_t)bt * 3 * H * D + (s * H + h) * D + j;   // (B, T, 3, H, D)
    T* heads = s == 0 ? q : s == 1 ? k : v;
    T* head_row = heads + (((size_t)b * H + h) * T_ + t) * D + j;             // (B, H, T, D)
    const T* src = kBackward ? head_row : packed_row;
    T* dst = kBackward ? packed_row : head_row;
    float x1[W], x2[W];
    load_w<W>(src, x1);
    load_w<W>(src + half, x2);
    if (s < 2) {  // q and k rotate; v passes through
        float c[W], sn[W];
        load_w<W>(cos + (size_t)t * half + j, c);
        load_w<W>(sin + (size_t)t * half + j, sn);
#pragma unroll
        for (int i = 0; i < W; i++) {
            // backward: rotate by -theta
            const float a = x1[i], b2 = x2[i], si = kBackward ? -sn[i] : sn[i];
            x1[i] = a * c[i] - b2 * si;
            x2[i] = a * si + b2 * c[i];
        }
    }
    store_w<W>(dst, x1);
    store_w<W>(dst + half, x2);
}

// Checks shapes and launches one direction; the head tensors give B, H, T, D.
template <bool kBackward>
static void launch(const at::Tensor& packed, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK(q.is_cuda() && q.dim() == 4, "q, k, v must be 4-D (B, H, T, D) CUDA tensors");
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
    TORCH_CHECK(D % 2 == 0, "head dim must be even for RoPE, got ", D);
    for (const auto* t : {&q, &k, &v}) {
        TORCH_CHECK(t->sizes() == q.sizes() && t->is_contiguous(),
                    "q, k, v must be contiguous and of one shape");
        TORCH_CHECK(t->scalar_type() == packed.scalar_type(), "q, k, v must have qkv's dtype");
    }
    TORCH_CHECK(packed.is_contiguous() && packed.dim() == 3 && packed.size(0) == B &&
                    packed.size(1) == T && packed.size(2) == 3 * H * D,
                "qkv must be contiguous (B, T, 3*H*D) = ", B, " ", T, " ", 3 * H * D, ", got ",
                packed.sizes());
    for (const auto* t : {&cos, &sin})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                        t->size(0) == T && t->size(1) == D / 2,
                    "cos and sin must be contiguous float32 (T, D/2) = (", T, ", ", D / 2, ")");
    const at::cuda::OptionalCUDAGuard guard(packed.device());
    if (packed.numel() == 0) return;
    const bool vec = (D / 2) % 8 == 0 && aligned16({packed, q, k, v, cos, sin});
    const int64_t units = packed.numel() / 2 / (vec ? 8 : 1);
    const int threads = 256, blocks = (units + threads - 1) / threads;
    AVA_DISPATCH(packed.scalar_type(), Tp, [&] {
        if (vec)
            qkv_rope_kernel<Tp, 8, kBackward><<<blocks, threads, 0, stream()>>>(
                ptr<Tp>(packed), ptr<Tp>(q), ptr<Tp>(k), ptr<Tp>(v), ptr<float>(cos),
                ptr<float>(sin), units, T, H, D);
        else
            qkv_rope_kernel<Tp, 1, kBackward><<<blocks, threads, 0, stream()>>>(
                ptr<Tp>(packed), ptr<Tp>(q), ptr<Tp>(k), ptr<Tp>(v), ptr<float>(cos),
                ptr<float>(sin), units, T, H, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

void qkv_rope_fwd(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                  at::Tensor& q, at::Tensor& k, at::Tensor& v) {
    launch<false>(qkv, q, k, v, cos, sin);
}

void qkv_rope_bwd(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                  const at::Tensor& cos, const at::Tensor& sin, at::Tensor& dqkv) {
    launch<true>(dqkv, dq, dk, dv, cos, sin);
}

// ---------------------------------------------------------------------------------------------
// norm_qkv_rope: a decode step's RMSNorm, qkv projection and RoPE in one launch, where the unfused
// path makes three (rms_norm, cuBLAS's GEMV, qkv_rope), each waiting on the one before.
//   xn = x * rstd * norm_w, rstd = 1 / sqrt(mean(x^2) + eps);  qkv = xn w_qkv^T;
//   then qkv_rope's forward: q, k rotated, v copied, each (B, H, T, D).
// Shapes: x (B, T, C) fp32 or bf16 with N = B*T <= kMaxTokens; norm_w (C,) in x's dtype; w_qkv
// (3C, C) fp32 or bf16, rows [q; k; v], each H heads of D rows (nn.Linear's weight); cos, sin
// (T, D/2) fp32, row t = token % T; q, k, v (B, H, T, D) contiguous, fp32 or bf16. Computed in
// fp32, rounded once, at the store.
// Work split: pair p in [0, 3C/2), p = (s*H + h)*D/2 + d for section s (q, k, v), head h, channel
// d < D/2, owns rows s*C + h*D + d and that + D/2 of w_qkv: the two channels RoPE rotates
// together. A warp owns 2 pairs (4 rows; blocks of 4 warps) for one tile of 8 tokens (blockIdx.y:
// a tile a block keeps a batch of 32 as parallel as a batch of 1). Each lane streams its share of
// C in 16-byte steps (8 bf16 or 4 fp32 elements), loading the 4 rows', the 8 tokens' and norm_w's
// chunk at once (no branch in the loop: rows past the tile's end repeat its last), and accumulates
// dot[r][j] += (w_r * norm_w) . x_j and sumsq[j] += x_j . x_j. The norm needs no pass of its own:
// w . (x * rstd * norm_w) = rstd * ((w * norm_w) . x), so rstd_j scales the sums.
// Two reduce-scatters over the warp (31 + 9 shuffles, where 40 warp sums take 200) leave lane
// r*8 + j with dot[r][j] and sumsq[j]; the two lanes of a pair swap values, rotate, and each
// writes its channel.
// Traffic: w_qkv once per tile (3C^2 elements: 1.5 MB in bf16 at C = 512, the bulk; the tiles
// past the first mostly hit L2); x (N*C), norm_w and cos, sin are re-read by every warp (from L1
// or L2); q, k, v 3*N*C written once. 16-byte loads when C % 8 == 0 and x, norm_w, w_qkv are
// 16-byte aligned, else a scalar path.
// Test: pytest tests/test_kernels_rope.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=norm_qkv_rope

constexpr int kMaxTokens = 64;  // N = B*T: a decode or speculative step (rope.py's MAX_TOKENS)
constexpr int kTile = 8;        // tokens per pass of a warp
constexpr int kPairs = 2;       // rope pairs per warp
constexpr int kRows = 2 * kPairs;
constexpr int kWarps = 4;       // per block
constexpr int kMinBlocks = 4;   // per SM: <= 128 registers, 16 warps to keep loads in flight

namespace {

// Halving steps of warp_sum_scatter, O = M/2, M/4, .., 1: a lane keeps the half of its values that
// its partner across bit O sends it. O is a template argument so every index of v is a constant:
// a loop over O leaves v in local memory.
template <int O, int M> __device__ __forceinline__ void scatter_steps(float (&v)[M], int lane) {
    if constexpr (O > 0) {
        const bool upper = lane & O;
#pragma unroll
        for (int i = 0; i < O; i++) {
            const float keep = upper ? v[i + O] : v[i], send = upper ? v[i] : v[i + O];
            v[i] = keep + __shfl_xor_sync(0xffffffff, send, O);
        }
        scatter_steps<O / 2>(v, lane);
    }
}

// Sums each of M values (M a power of two <= 32) over the warp and returns value lane % M's sum,
// in M - 1 + log2(32 / M) shuffles where M warp sums take 5M: after the halving steps, lanes that
// differ above bit log2(M) hold parts of the same value.
template <int M> __device__ __forceinline__ float warp_sum_scatter(float (&v)[M]) {
    const int lane = threadIdx.x % 32;
    scatter_steps<M / 2>(v, lane);
#pragma unroll
    for (int o = M; o < 32; o *= 2) v[0] += __shfl_xor_sync(0xffffffff, v[0], o);
    return v[0];
}

}  // namespace

template <typename TX, typename TW, typename TO>
__global__ void __launch_bounds__(32 * kWarps, kMinBlocks)
norm_qkv_rope_kernel(const TX* __restrict__ x, const TX* __restrict__ norm_w,
                     const TW* __restrict__ w_qkv, const float* __restrict__ cos,
                     const float* __restrict__ sin, TO* __restrict__ q, TO* __restrict__ k,
                     TO* __restrict__ v, int N, int T_, int C, int H, float eps, bool vec) {
    // elements a lane loads per row and step: 16 bytes of the wider dtype (8 bf16 or 4 fp32), so
    // fp32 holds as many bytes in flight as bf16 in as many registers
    constexpr int E = sizeof(TX) == 4 || sizeof(TW) == 4 ? 4 : 8;
    const int lane = threadIdx.x % 32, half = C / H / 2, pairs = 3 * C / 2;
    const int p0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kPairs;
    if (p0 >= pairs) return;
    const TW* w[kRows];  // row r: pair p0 + r / 2, channel d (r even) or d + D/2 (r odd)
#pragma unroll
    for (int r = 0; r < kRows; r++) {
        const int p = min(p0 + r / 2, pairs - 1);  // past the end: the last pair, not written
        w[r] = w_qkv + (size_t)((p / half) * 2 * half + p % half + (r % 2) * half) * C;
    }
    // after the reduce-scatters, this lane owns row r = lane / 8 for token j = lane % 8 of a tile
    const int r = lane / kTile, j = lane % kTile, p = p0 + r / 2, pc = min(p, pairs - 1);
    const int head_row = pc / half, s = head_row / H, h = head_row % H, d = pc % half;
    TO* out = (s == 0 ? q : s == 1 ? k : v) + (size_t)h * T_ * 2 * half + d + (r % 2) * half;
    for (int n0 = blockIdx.y * kTile; n0 < N; n0 += gridDim.y * kTile) {  // this block's tiles
        const int n = min(kTile, N - n0);
        const TX* xs[kTile];
#pragma unroll
        for (int i = 0; i < kTile; i++) xs[i] = x + (size_t)(n0 + min(i, n - 1)) * C;
        float dot[kRows * kTile] = {}, sumsq[kTile] = {};  // dot[r * kTile + j]
        if (vec) {
            for (int c = lane * E; c < C; c += 32 * E) {
                Chunk<TW, E> wr[kRows];
                Chunk<TX, E> xr[kTile], gr;
#pragma unroll
                for (int i = 0; i < kRows; i++) wr[i].load(w[i] + c);
#pragma unroll
                for (int i = 0; i < kTile; i++) xr[i].load(xs[i] + c);
                gr.load(norm_w + c);
                float g[E];
                gr.floats(g);
#pragma unroll
                for (int i = 0; i < kTile; i++) {
                    float xf[E];
                    xr[i].floats(xf);
#pragma unroll
                    for (int e = 0; e < E; e++) sumsq[i] += xf[e] * xf[e];
                }
#pragma unroll
                for (int ri = 0; ri < kRows; ri++) {
                    float wg[E];
                    wr[ri].floats(wg);
#pragma unroll
                    for (int e = 0; e < E; e++) wg[e] *= g[e];
#pragma unroll
                    for (int i = 0; i < kTile; i++) {
                        float xf[E];
                        xr[i].floats(xf);
#pragma unroll
                        for (int e = 0; e < E; e++) dot[ri * kTile + i] += wg[e] * xf[e];
                    }
                }
            }
        } else {
            for (int c = lane; c < C; c += 32) {
                const float g = to_float(norm_w[c]);
                float wg[kRows], xf[kTile];
#pragma unroll
                for (int i = 0; i < kRows; i++) wg[i] = to_float(w[i][c]) * g;
#pragma unroll
                for (int i = 0; i < kTile; i++) xf[i] = to_float(xs[i][c]);
#pragma unroll
                for (int i = 0; i < kTile; i++) {
                    sumsq[i] += xf[i] * xf[i];
#pragma unroll
                    for (int ri = 0; ri < kRows; ri++) dot[ri * kTile + i] += wg[ri] * xf[i];
                }
            }
        }
        const float rstd = rsqrtf(warp_sum_scatter(sumsq) / C + eps);
        const float mine = rstd * warp_sum_scatter(dot);
        const float other = __shfl_xor_sync(0xffffffff, mine, kTile);  // lane ^ 8: r ^ 1
        if (j < n && p < pairs) {
            const int token = n0 + j, b = token / T_, t = token % T_;
            float value = mine;
            if (s < 2) {  // q and k rotate: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
                const float c = cos[(size_t)t * half + d], sn = sin[(size_t)t * half + d];
                value = r % 2 == 0 ? mine * c - other * sn : other * sn + mine * c;
            }
            out[((size_t)b * H * T_ + t) * 2 * half] = from_float<TO>(value);
        }
    }
}

void norm_qkv_rope(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& w_qkv,
                   const at::Tensor& cos, const at::Tensor& sin, double eps, at::Tensor& q,
                   at::Tensor& k, at::Tensor& v) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.is_contiguous(),
                "norm_qkv_rope: x must be a contiguous (B, T, C) CUDA tensor, got ", x.sizes());
    const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
    TORCH_CHECK(B * T <= kMaxTokens, "norm_qkv_rope takes B*T <= ", kMaxTokens, " tokens, got ",
                B * T);
    TORCH_CHECK(q.dim() == 4 && q.size(0) == B && q.size(2) == T && q.size(1) * q.size(3) == C &&
                    q.size(3) % 2 == 0,
                "norm_qkv_rope: q, k, v must be (B, H, T, D) with H*D = C = ", C,
                " and D even, got ", q.sizes());
    const int64_t H = q.size(1), D = q.size(3);
    for (const auto* t : {&q, &k, &v})
        TORCH_CHECK(t->sizes() == q.sizes() && t->is_contiguous() &&
                        t->scalar_type() == q.scalar_type(),
                    "norm_qkv_rope: q, k, v must be contiguous, of one shape and one dtype");
    TORCH_CHECK(norm_w.dim() == 1 && norm_w.size(0) == C && norm_w.is_contiguous() &&
                    norm_w.scalar_type() == x.scalar_type(),
                "norm_qkv_rope: norm_w must be contiguous (C,) = (", C, ") in x's dtype");
    TORCH_CHECK(w_qkv.dim() == 2 && w_qkv.size(0) == 3 * C && w_qkv.size(1) == C &&
                    w_qkv.is_contiguous(),
                "norm_qkv_rope: w_qkv must be contiguous (3C, C) = (", 3 * C, ", ", C, "), got ",
                w_qkv.sizes());
    for (const auto* t : {&cos, &sin})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                        t->size(0) == T && t->size(1) == D / 2,
                    "norm_qkv_rope: cos and sin must be contiguous float32 (T, D/2) = (", T, ", ",
                    D / 2, ")");
    if (B * T == 0 || C == 0) return;
    const at::cuda::OptionalCUDAGuard guard(x.device());
    const bool vec = C % 8 == 0 && aligned16({x, norm_w, w_qkv});
    const int warps = (3 * C / 2 + kPairs - 1) / kPairs;
    const dim3 blocks((warps + kWarps - 1) / kWarps, (B * T + kTile - 1) / kTile);
    AVA_DISPATCH(x.scalar_type(), TX, [&] {
        AVA_DISPATCH(w_qkv.scalar_type(), TW, [&] {
            AVA_DISPATCH(q.scalar_type(), TO, [&] {
                norm_qkv_rope_kernel<TX, TW, TO><<<blocks, 32 * kWarps, 0, stream()>>>(
                    ptr<TX>(x), ptr<TX>(norm_w), ptr<TW>(w_qkv), ptr<float>(cos),
                    ptr<float>(sin), ptr<TO>(q), ptr<TO>(k), ptr<TO>(v), B * T, T, C, H,
                    (float)eps, vec);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
        });
    });
}

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("qkv_rope_fwd(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) q, Tensor(b!) k, "
          "Tensor(c!) v) -> ()", &qkv_rope_fwd);
    m.def("qkv_rope_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin, Tensor(a!) dqkv) "
          "-> ()", &qkv_rope_bwd);
    m.def("norm_qkv_rope(Tensor x, Tensor norm_w, Tensor w_qkv, Tensor cos, Tensor sin, float eps, "
          "Tensor(a!) q, Tensor(b!) k, Tensor(c!) v) -> ()", &norm_qkv_rope);
}
