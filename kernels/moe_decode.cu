// The second half of a transformer block for a few tokens at inference (N*K <= 64 assignments:
// one decode step, a speculative step, a short prompt): the attention's residual add, the norm and
// the whole MoE layer with its residual add, in four launches where the training path makes ~20
// (add, norm, router matmul, softmax, top-k, gather, renormalise, sort, permute, two grouped GEMMs,
// activation, unpermute, cast, add). At this size each launch moves a few kilobytes to a few
// megabytes, so their count and their parallelism, not the bytes, set the time.
//   x (N, C) the residual stream, attn (N, C) the attention's output in x's dtype, norm_w (C,),
//   router_w (E, C), bias (E,) or none, w_in (E, I, C), w_out (E, C, F) with I = F (GELU) or 2F
//   (SwiGLU: rows [gate; up]) -> out (N, C) in x's dtype:
//   r = x + attn, xn = rms_norm(r) * norm_w (rounded to the matmuls' dtype, as the norm kernel
//   rounds it), out = r + MoE(xn) with the MoE's output rounded to x's dtype first (the sums the
//   unfused block rounds).
// Routing is Router's at inference: logits = xn router_w^T in fp32, the K largest logits + bias
// (ties to the lower expert), gates = softmax over the chosen logits (= softmax(logits) gathered
// and renormalised).
//   route:   one block. A warp per token row: r and xn; then a warp per (token, expert) logit;
//            a thread per token picks its top-k and gates; a thread per assignment finds its
//            place in the stable sort by expert -> order (M,) assignment per position, position
//            (M,) its inverse, and beside them a thread per expert its start -> starts (E+1,).
//   up:      a block per 16 weight rows of expert e (16 hidden units f, or 8 units' gate and up
//            rows for SwiGLU; 4 rows a warp on the CUDA cores), over e's positions p in tiles of 8:
//            h[p, f] = act(w_in[e, f] . xn[t(p)]), in xn's dtype (as the grouped path rounds it).
//            Blocks of experts no token chose return at once.
//   down:    a block per 16 output channels c of expert e (4 a warp on the CUDA cores) and a
//            quarter of F:
//            y[s, p, c] = w_out[e, c, part s] . h[p, part s], fp32.
//   combine: out[t, c] = r[t, c] + sum over t's K assignments of gate * (sum over s of
//            y[s, position, c]), in k order: no atomics, the same sums every call.
// Up and down stream each expert's weights once per call (the rows its tokens need) and their
// time is that of the loads in flight, not of the arithmetic: many small warps, and no branch in
// the inner loop. In bf16, with C and F multiples of 32, a block's 16 rows x 8 positions are one
// tensor-core mma (m16n8k16) per 16 elements, fed straight from 16-byte loads, each warp taking a
// quarter of the elements; otherwise (fp32, odd sizes) CUDA cores make a warp's dots of 4 rows x
// 8 positions and sum them over the warp, with 16-byte loads where rows of a multiple of 8 allow.
// Test: pytest tests/test_kernels_moe_decode.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=moe_decode
#include "common.cuh"

constexpr int kMaxAssignments = 64, kMaxExperts = 64;
constexpr int kTile = 8;        // positions per pass of a warp
constexpr int kRows = 4;        // weight rows per warp
constexpr int kWarps = 4;       // per block of up and down
constexpr int kMinBlocks = 4;   // per SM: <= 128 registers, 16 warps to keep loads in flight
constexpr int kSplit = 4;       // down: parts of F, summed by combine
constexpr int kRouteThreads = 1024;

// acc[r][j] += w_r[i] x_j[i] over i in [begin, end), for kRows weight rows w_r and kTile rows x_j
// (this lane's share; the caller sums over the warp). Rows past the tile's end repeat its last:
// no branch in the loop, so all kRows + kTile loads of a step are in flight at once.
template <typename TW, typename TX>
__device__ __forceinline__ void row_dots(const TW* const (&w)[kRows], const TX* const (&xs)[kTile],
                                         int begin, int end, bool vec,
                                         float (&acc)[kRows][kTile]) {
    const int lane = threadIdx.x % 32;
    if (vec) {
        for (int i = begin + lane * 8; i < end; i += 32 * 8) {
            Chunk<TW, 8> wr[kRows];
            Chunk<TX, 8> xr[kTile];
#pragma unroll
            for (int r = 0; r < kRows; r++) wr[r].load(w[r] + i);
#pragma unroll
            for (int j = 0; j < kTile; j++) xr[j].load(xs[j] + i);
#pragma unroll
            for (int r = 0; r < kRows; r++) {
                float wf[8];
                wr[r].floats(wf);
#pragma unroll
                for (int j = 0; j < kTile; j++) {
                    float xf[8];
                    xr[j].floats(xf);
#pragma unroll
                    for (int q = 0; q < 8; q++) acc[r][j] += wf[q] * xf[q];
                }
            }
        }
    } else {
        for (int i = begin + lane; i < end; i += 32) {
            float wv[kRows], xv[kTile];
#pragma unroll
            for (int r = 0; r < kRows; r++) wv[r] = to_float(w[r][i]);
#pragma unroll
            for (int j = 0; j < kTile; j++) xv[j] = to_float(xs[j][i]);
#pragma unroll
            for (int r = 0; r < kRows; r++)
#pragma unroll
                for (int j = 0; j < kTile; j++) acc[r][j] += wv[r] * xv[j];
        }
    }
}

// SwiGLU: silu(gate) * up; GELU: the exact (erf) one, as F.gelu (up unused).
template <bool kSwiglu> __device__ __forceinline__ float activation(float gate, float up) {
    return kSwiglu ? gate / (1.f + expf(-gate)) * up
                   : 0.5f * gate * (1.f + erff(gate * 0.70710678118654752f));
}

// acc += a b on the tensor cores: a 16 x 16 (bf16, row-major fragments a0..a3), b 16 x 8 (b0, b1),
// acc 16 x 8 in fp32. Lane (g = lane / 4, i = lane % 4) holds a's rows g and g + 8, b's column g
// and acc's rows g, g + 8 at columns 2i, 2i + 1 (PTX ISA, "mma.m16n8k16").
__device__ __forceinline__ void mma_bf16(float (&acc)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // the host takes this path on sm_80 and newer only
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// acc = the dots over [begin, end) (a multiple of 32 long) of this lane's weight rows w_lo (row g)
// and w_hi (row g + 8) with its x row (position g of the tile), laid out as mma_bf16's acc. A lane
// loads 8 consecutive elements of each row per 32 (16 bytes, lanes 0-3 of a row cover 64 bytes)
// and hands them to two mmas as the fragments' k = 2i, 2i + 1, 2i + 8, 2i + 9: the 32 elements
// reach the mmas in another order than k's, the same for a and b, so the sums are the dots.
__device__ __forceinline__ void tile_mma(const bf16* w_lo, const bf16* w_hi, const bf16* x,
                                         int begin, int end, float (&acc)[4]) {
#pragma unroll 4
    for (int k = begin + threadIdx.x % 4 * 8; k < end; k += 32) {
        const uint4 lo = *reinterpret_cast<const uint4*>(w_lo + k);
        const uint4 hi = *reinterpret_cast<const uint4*>(w_hi + k);
        const uint4 b = *reinterpret_cast<const uint4*>(x + k);
        mma_bf16(acc, lo.x, hi.x, lo.y, hi.y, b.x, b.y);
        mma_bf16(acc, lo.z, hi.z, lo.w, hi.w, b.z, b.w);
    }
}

// tile_mma over [begin, end) by a whole block: warp w takes the w-th of kWarps runs (multiples of
// 32), so each warp's loads are all in flight at once even when few blocks run (at batch 1 a
// decode step reads 2 experts). The runs' sums, added in warp order, end in warp 0's acc.
__device__ __forceinline__ void block_tile_mma(const bf16* w_lo, const bf16* w_hi, const bf16* x,
                                               int begin, int end, float (&acc)[4]) {
    __shared__ float partial[kWarps - 1][32][4];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int run = (end - begin + 32 * kWarps - 1) / (32 * kWarps) * 32;
    const int lo = min(end, begin + warp * run), hi = min(end, lo + run);
#pragma unroll
    for (int q = 0; q < 4; q++) acc[q] = 0.f;
    tile_mma(w_lo, w_hi, x, lo, hi, acc);
    if (warp > 0) {
#pragma unroll
        for (int q = 0; q < 4; q++) partial[warp - 1][lane][q] = acc[q];
    }
    __syncthreads();
    if (warp == 0) {
        for (int w = 0; w < kWarps - 1; w++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[q] += partial[w][lane][q];
    }
    __syncthreads();  // partial is free for the next tile
}

// r = x + attn rounded to TO, and xn = r * rstd * norm_w rounded to TX, for one token row (a warp).
template <typename TO, typename TX, typename TR>
__device__ __forceinline__ void add_norm_row(const TO* x, const TO* attn, const TR* norm_w, TO* r,
                                             TX* xn, int C, float eps, bool vec) {
    const int lane = threadIdx.x % 32;
    float sum_sq = 0.f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float xv[8], av[8];
            load8(x + c, xv);
            load8(attn + c, av);
#pragma unroll
            for (int q = 0; q < 8; q++) {
                xv[q] = to_float(from_float<TO>(xv[q] + av[q]));
                sum_sq += xv[q] * xv[q];
            }
            store8(r + c, xv);
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            const TO v = from_float<TO>(to_float(x[c]) + to_float(attn[c]));
            r[c] = v;
            sum_sq += to_float(v) * to_float(v);
        }
    }
    scale_row(r, norm_w, xn, C, rsqrtf(warp_sum(sum_sq) / C + eps), vec);
}

template <typename TO, typename TX, typename TR>
__global__ void __launch_bounds__(kRouteThreads)
route_kernel(const TO* __restrict__ x, const TO* __restrict__ attn,
             const TR* __restrict__ norm_w, const TR* __restrict__ router_w,
             const float* __restrict__ bias, TO* r, TX* xn, float* __restrict__ gates,
             int* __restrict__ order, int* __restrict__ position, int* __restrict__ starts, int N,
             int C, int E, int K, float eps, bool vec) {
    __shared__ float logits[kMaxAssignments][kMaxExperts];
    __shared__ int expert_of[kMaxAssignments];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, M = N * K;
    for (int t = warp; t < N; t += kRouteThreads / 32)
        add_norm_row(x + (size_t)t * C, attn + (size_t)t * C, norm_w, r + (size_t)t * C,
                     xn + (size_t)t * C, C, eps, vec);
    __syncthreads();  // xn's rows, written by other warps, are read below
    for (int pair = warp; pair < N * E; pair += kRouteThreads / 32) {  // a warp per logit
        const TX* xr = xn + (size_t)(pair / E) * C;
        const TR* wr = router_w + (size_t)(pair % E) * C;
        float dot = 0.f;
        if (vec) {
            for (int c = lane * 8; c < C; c += 256) {
                float xv[8], wv[8];
                load8(xr + c, xv);
                load8(wr + c, wv);
#pragma unroll
                for (int q = 0; q < 8; q++) dot += xv[q] * wv[q];
            }
        } else {
            for (int c = lane; c < C; c += 32) dot += to_float(xr[c]) * to_float(wr[c]);
        }
        dot = warp_sum(dot);
        if (lane == 0) logits[pair / E][pair % E] = dot;
    }
    __syncthreads();
    const int t = threadIdx.x;
    if (t < N) {  // this token's top-k, one at a time, and its gates
        unsigned long long taken = 0;  // E <= 64 experts as bits
        float top = -INFINITY;
        for (int k = 0; k < K; k++) {
            int best = -1;
            float best_score = -INFINITY;
            for (int e = 0; e < E; e++) {
                const float score = logits[t][e] + (bias ? bias[e] : 0.f);
                if (!((taken >> e) & 1) && (best < 0 || score > best_score)) {
                    best = e;
                    best_score = score;
                }
            }
            taken |= 1ull << best;
            expert_of[t * K + k] = best;
            top = fmaxf(top, logits[t][best]);
        }
        float total = 0.f;
        for (int k = 0; k < K; k++) total += expf(logits[t][expert_of[t * K + k]] - top);
        for (int k = 0; k < K; k++)
            gates[t * K + k] = expf(logits[t][expert_of[t * K + k]] - top) / total;
    }
    __syncthreads();
    const int a = threadIdx.x;
    if (a < M) {  // place in the stable sort: lower experts first, then earlier assignments
        const int e = expert_of[a];
        int place = 0;
        for (int b = 0; b < M; b++) place += expert_of[b] < e || (expert_of[b] == e && b < a);
        order[place] = a;
        position[a] = place;
    }
    const int expert = a - kMaxAssignments;  // threads past the assignments' beside them
    if (expert >= 0 && expert <= E) {  // starts[expert]: assignments to lower experts
        int below = 0;
        for (int b = 0; b < M; b++) below += expert_of[b] < expert;
        starts[expert] = below;
    }
}

// Row pointers of one tile: positions p0 .. p0 + n - 1 (n <= kTile), the rest repeat the last.
// by_position: rows p of src (h); else rows of the tokens t(p) = order[p] / K (x).
template <typename TX>
__device__ __forceinline__ int tile_rows(const TX* src, const int* order, int p0, int last,
                                         int K, int len, bool by_position,
                                         const TX* (&rows)[kTile]) {
    const int n = min(kTile, last - p0);
#pragma unroll
    for (int j = 0; j < kTile; j++) {
        const int p = p0 + min(j, n - 1);
        rows[j] = src + (size_t)(by_position ? p : order[p] / K) * len;
    }
    return n;
}

// A warp's kRows weight rows: kRows hidden units (GELU), or kRows / 2 units' gate rows then their
// up rows (SwiGLU: rows f and F + f of w_in), so one pass over x serves both.
template <typename TX, typename TW, bool kSwiglu>
__global__ void __launch_bounds__(32 * kWarps, kMinBlocks)
up_kernel(const TX* __restrict__ x, const TW* __restrict__ w_in, const int* __restrict__ order,
          const int* __restrict__ starts, TX* __restrict__ h, int C, int F, int K, bool vec) {
    constexpr int kUnits = kSwiglu ? kRows / 2 : kRows;
    const int e = blockIdx.y, first = starts[e], last = starts[e + 1];
    const int f0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kUnits;
    if (first == last || f0 >= F) return;
    const int rows_in = kSwiglu ? 2 * F : F;
    const TW* w[kRows];  // units past F repeat unit F - 1 and are not written
#pragma unroll
    for (int r = 0; r < kRows; r++) {
        const int unit = min(f0 + r % kUnits, F - 1), row = r < kUnits ? unit : F + unit;
        w[r] = w_in + ((size_t)e * rows_in + row) * C;
    }
    for (int p0 = first; p0 < last; p0 += kTile) {
        const TX* xs[kTile];
        const int n = tile_rows(x, order, p0, last, K, C, false, xs);
        float dot[kRows][kTile] = {};
        row_dots(w, xs, 0, C, vec, dot);
#pragma unroll
        for (int u = 0; u < kUnits; u++) {
#pragma unroll
            for (int j = 0; j < kTile; j++) {
                if (j >= n) break;
                const float g = warp_sum(dot[u][j]);
                const float act = activation<kSwiglu>(g, kSwiglu ? warp_sum(dot[kUnits + u][j])
                                                                 : 0.f);
                if (threadIdx.x % 32 == 0 && f0 + u < F)
                    h[(size_t)(p0 + j) * F + f0 + u] = from_float<TX>(act);
            }
        }
    }
}

// y[split][p][c]: the dot over part `split` (blockIdx.z) of F; combine sums the parts.
template <typename TX, typename TW>
__global__ void __launch_bounds__(32 * kWarps, kMinBlocks)
down_kernel(const TX* __restrict__ h, const TW* __restrict__ w_out, const int* __restrict__ order,
            const int* __restrict__ starts, float* __restrict__ y, int M, int C, int F,
            bool vec) {
    const int e = blockIdx.y, first = starts[e], last = starts[e + 1];
    const int c0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
    if (first == last || c0 >= C) return;
    // a multiple of 8, so vector loads stay aligned; for a small F the last parts may be empty
    const int part = ((F + kSplit - 1) / kSplit + 7) / 8 * 8;
    const int begin = blockIdx.z * part, end = min(F, begin + part);
    const TW* w[kRows];  // rows past C repeat row C - 1 and are not written
#pragma unroll
    for (int r = 0; r < kRows; r++) w[r] = w_out + ((size_t)e * C + min(c0 + r, C - 1)) * F;
    float* ys = y + (size_t)blockIdx.z * M * C;
    for (int p0 = first; p0 < last; p0 += kTile) {
        const TX* hs[kTile];
        const int n = tile_rows(h, order, p0, last, 0, F, true, hs);
        float dot[kRows][kTile] = {};
        row_dots(w, hs, begin, end, vec, dot);
#pragma unroll
        for (int r = 0; r < kRows; r++) {
#pragma unroll
            for (int j = 0; j < kTile; j++) {
                if (j >= n) break;
                const float sum = warp_sum(dot[r][j]);
                if (threadIdx.x % 32 == 0 && c0 + r < C) ys[(size_t)(p0 + j) * C + c0 + r] = sum;
            }
        }
    }
}

// up_kernel and down_kernel on the tensor cores, for bf16 with C and F multiples of 32: a block
// per 16 rows (up: 16 units, or SwiGLU's gate rows of 8 units then their up rows) x 8 positions.
template <bool kSwiglu>
__global__ void __launch_bounds__(32 * kWarps)
up_mma_kernel(const bf16* __restrict__ x, const bf16* __restrict__ w_in,
              const int* __restrict__ order, const int* __restrict__ starts, bf16* __restrict__ h,
              int C, int F, int K) {
    constexpr int kUnits = kSwiglu ? 8 : 16;
    const int e = blockIdx.y, first = starts[e], last = starts[e + 1], f0 = blockIdx.x * kUnits;
    if (first == last) return;
    const int g = threadIdx.x % 32 / 4, i = threadIdx.x % 4;
    const bf16* w = w_in + (size_t)e * (kSwiglu ? 2 * F : F) * C;
    const bf16* w_lo = w + (size_t)(f0 + g) * C;
    const bf16* w_hi = w + (size_t)(kSwiglu ? F + f0 + g : f0 + 8 + g) * C;
    for (int p0 = first; p0 < last; p0 += kTile) {
        const int n = min(kTile, last - p0);  // positions past n repeat the last, unwritten
        float acc[4];
        block_tile_mma(w_lo, w_hi, x + (size_t)(order[p0 + min(g, n - 1)] / K) * C, 0, C, acc);
#pragma unroll
        for (int j = 0; j < 2; j++) {  // acc[j]: row g, acc[2 + j]: row g + 8; position 2i + j
            if (threadIdx.x >= 32 || 2 * i + j >= n) break;
            bf16* out = h + (size_t)(p0 + 2 * i + j) * F + f0 + g;
            if (kSwiglu) {
                out[0] = from_float<bf16>(activation<true>(acc[j], acc[2 + j]));
            } else {
                out[0] = from_float<bf16>(activation<false>(acc[j], 0.f));
                out[8] = from_float<bf16>(activation<false>(acc[2 + j], 0.f));
            }
        }
    }
}

__global__ void __launch_bounds__(32 * kWarps)
down_mma_kernel(const bf16* __restrict__ h, const bf16* __restrict__ w_out,
                const int* __restrict__ starts, float* __restrict__ y, int M, int C, int F) {
    const int e = blockIdx.y, first = starts[e], last = starts[e + 1], c0 = blockIdx.x * 16;
    if (first == last) return;
    const int part = (F + 32 * kSplit - 1) / (32 * kSplit) * 32;  // parts past F are empty: 0
    const int begin = min(F, blockIdx.z * part), end = min(F, begin + part);
    const int g = threadIdx.x % 32 / 4, i = threadIdx.x % 4;
    const bf16* w_lo = w_out + ((size_t)e * C + c0 + g) * F;
    float* ys = y + (size_t)blockIdx.z * M * C;
    for (int p0 = first; p0 < last; p0 += kTile) {
        const int n = min(kTile, last - p0);
        float acc[4];
        block_tile_mma(w_lo, w_lo + (size_t)8 * F, h + (size_t)(p0 + min(g, n - 1)) * F, begin,
                       end, acc);
#pragma unroll
        for (int j = 0; j < 2; j++) {
            if (threadIdx.x >= 32 || 2 * i + j >= n) break;
            float* out = ys + (size_t)(p0 + 2 * i + j) * C + c0 + g;
            out[0] = acc[j];
            out[8] = acc[2 + j];
        }
    }
}

template <typename TO>
__global__ void combine_kernel(const float* __restrict__ y, const float* __restrict__ gates,
                               const int* __restrict__ position, const TO* __restrict__ r,
                               TO* __restrict__ out, int N, int C, int K) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * C) return;
    const int t = i / C, c = i % C;
    const size_t part = (size_t)N * K * C;
    float sum = 0.f;
    for (int k = 0; k < K; k++) {
        const float* row = y + (size_t)position[t * K + k] * C + c;
        float dot = 0.f;
#pragma unroll
        for (int s = 0; s < kSplit; s++) dot += row[s * part];
        sum += gates[t * K + k] * dot;
    }
    out[i] = from_float<TO>(to_float(r[i]) + to_float(from_float<TO>(sum)));
}

// up and down for every assignment: h = act(w_in xn) per expert, then y (kSplit, M, C), on the
// tensor cores where dtype, sizes, alignment and arch allow, else on the CUDA cores.
static void project(const at::Tensor& xn, const at::Tensor& w_in, const at::Tensor& w_out,
                    const at::Tensor& order, const at::Tensor& starts, at::Tensor& h,
                    at::Tensor& y, int K, bool swiglu) {
    const int M = h.size(0), F = h.size(1), C = xn.size(1), E = w_in.size(0);
    int device, arch_major;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&arch_major, cudaDevAttrComputeCapabilityMajor, device));
    const bool tensor_cores = xn.scalar_type() == at::kBFloat16 &&
                              w_in.scalar_type() == at::kBFloat16 && C % 32 == 0 && F % 32 == 0 &&
                              aligned16({w_in, w_out}) && arch_major >= 8;
    if (tensor_cores) {
        auto up = swiglu ? up_mma_kernel<true> : up_mma_kernel<false>;
        up<<<dim3(F / (swiglu ? 8 : 16), E), 32 * kWarps, 0, stream()>>>(
            ptr<bf16>(xn), ptr<bf16>(w_in), ptr<int>(order), ptr<int>(starts), ptr<bf16>(h), C, F,
            K);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        down_mma_kernel<<<dim3(C / 16, E, kSplit), 32 * kWarps, 0, stream()>>>(
            ptr<bf16>(h), ptr<bf16>(w_out), ptr<int>(starts), ptr<float>(y), M, C, F);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
    }
    const bool vec_up = C % 8 == 0 && aligned16({w_in});  // xn is freshly allocated: aligned
    const bool vec_down = F % 8 == 0 && aligned16({w_out});
    const int rows_per_block = kWarps * kRows;
    const int units_per_block = kWarps * (swiglu ? kRows / 2 : kRows);
    AVA_DISPATCH(xn.scalar_type(), TX, [&] {
        AVA_DISPATCH(w_in.scalar_type(), TW, [&] {
            dim3 up_grid((F + units_per_block - 1) / units_per_block, E);
            auto up = swiglu ? up_kernel<TX, TW, true> : up_kernel<TX, TW, false>;
            up<<<up_grid, 32 * kWarps, 0, stream()>>>(ptr<TX>(xn), ptr<TW>(w_in),
                                                       ptr<int>(order), ptr<int>(starts),
                                                       ptr<TX>(h), C, F, K, vec_up);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            dim3 down_grid((C + rows_per_block - 1) / rows_per_block, E, kSplit);
            down_kernel<TX, TW><<<down_grid, 32 * kWarps, 0, stream()>>>(
                ptr<TX>(h), ptr<TW>(w_out), ptr<int>(order), ptr<int>(starts), ptr<float>(y),
                M, C, F, vec_down);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
}

void moe_decode(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& norm_w,
                double eps, const at::Tensor& router_w, const std::optional<at::Tensor>& bias,
                const at::Tensor& w_in, const at::Tensor& w_out, int64_t top_k, bool swiglu,
                at::ScalarType dtype, at::Tensor& out) {
    const int N = x.size(0), C = x.size(1), E = w_in.size(0), F = w_out.size(2), K = top_k;
    TORCH_CHECK(N * K <= kMaxAssignments && E <= kMaxExperts && K <= E,
                "moe_decode takes N*K <= 64 assignments and E <= 64 experts");
    TORCH_CHECK(attn.sizes() == x.sizes() && norm_w.numel() == C && router_w.size(1) == C,
                "moe_decode: attn must be x's shape (N, C), norm_w (C,) and router_w (E, C)");
    TORCH_CHECK(w_in.size(1) == (swiglu ? 2 * F : F) && w_in.size(2) == C && w_out.size(1) == C,
                "moe_decode: w_in must be (E, I, C) and w_out (E, C, F)");
    TORCH_CHECK(w_in.scalar_type() == w_out.scalar_type() &&
                norm_w.scalar_type() == router_w.scalar_type() &&
                attn.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
                "moe_decode: w_in and w_out, norm_w and router_w, x, attn and out share dtypes");
    TORCH_CHECK(x.is_contiguous() && attn.is_contiguous() && norm_w.is_contiguous() &&
                router_w.is_contiguous() && w_in.is_contiguous() && w_out.is_contiguous() &&
                out.is_contiguous(), "moe_decode wants contiguous tensors");
    if (N == 0) return;
    const at::cuda::OptionalCUDAGuard guard(x.device());
    const int M = N * K;
    auto ints = x.options().dtype(at::kInt);
    at::Tensor r = at::empty({N, C}, x.options()), xn = at::empty({N, C}, x.options().dtype(dtype));
    at::Tensor gates = at::empty({M}, x.options().dtype(at::kFloat));
    at::Tensor order = at::empty({M}, ints), position = at::empty({M}, ints);
    at::Tensor starts = at::empty({E + 1}, ints);
    at::Tensor h = at::empty({M, F}, xn.options());
    at::Tensor y = at::empty({kSplit, M, C}, x.options().dtype(at::kFloat));
    const float* bias_ptr = nullptr;
    at::Tensor bias_f;
    if (bias.has_value()) {
        bias_f = bias->to(at::kFloat).contiguous();
        bias_ptr = ptr<float>(bias_f);
    }
    const bool vec_route = C % 8 == 0 && aligned16({x, attn, norm_w, router_w});
    AVA_DISPATCH(x.scalar_type(), TO, [&] {
        AVA_DISPATCH(dtype, TX, [&] {
            AVA_DISPATCH(router_w.scalar_type(), TR, [&] {
                route_kernel<TO, TX, TR><<<1, kRouteThreads, 0, stream()>>>(
                    ptr<TO>(x), ptr<TO>(attn), ptr<TR>(norm_w), ptr<TR>(router_w), bias_ptr,
                    ptr<TO>(r), ptr<TX>(xn), ptr<float>(gates), ptr<int>(order),
                    ptr<int>(position), ptr<int>(starts), N, C, E, K, (float)eps, vec_route);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
        });
    });
    project(xn, w_in, w_out, order, starts, h, y, K, swiglu);
    AVA_DISPATCH(x.scalar_type(), TO, [&] {
        combine_kernel<TO><<<(N * C + 255) / 256, 256, 0, stream()>>>(
            ptr<float>(y), ptr<float>(gates), ptr<int>(position), ptr<TO>(r), ptr<TO>(out), N,
            C, K);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("moe_decode(Tensor x, Tensor attn, Tensor norm_w, float eps, Tensor router_w, "
          "Tensor? bias, Tensor w_in, Tensor w_out, int top_k, bool swiglu, ScalarType dtype, "
          "Tensor(a!) out) -> ()", &moe_decode);
}
