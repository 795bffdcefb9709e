// Attention's qkv split + rotary position embedding (RoPE, Su et al. 2021), forward and backward,
// in one pass.
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
// Time: python kernels/bench.py --op=qkv_rope
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

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("qkv_rope_fwd(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) q, Tensor(b!) k, "
          "Tensor(c!) v) -> ()", &qkv_rope_fwd);
    m.def("qkv_rope_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin, Tensor(a!) dqkv) "
          "-> ()", &qkv_rope_bwd);
}
