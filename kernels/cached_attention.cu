// Attention of a few new tokens over the KV cache, in one launch where the cache update and SDPA
// make ~7 (two position tensors, two index_copy, the mask's conversion, attention, the transpose
// back to (B, T, C)).
//   q, k, v (B, H, T, D) the new tokens' (q, k rotated), cache_k, cache_v (B, H, S, D),
//   pos () int64 the first new position, mask (Bm, T, S) bool with Bm = 1 or B (True: may attend)
//   -> cache_k/v[:, :, pos + t] = k/v[:, :, t], and y (B, T, H*D) in q's dtype:
//   y[b, t, h] = softmax_j(q[b, h, t] . cache_k[b, h, j] / sqrt(D), over mask[b, t, j]) cache_v
// Keys at or past pos + T hold nothing yet and are skipped: the causal mask hides them anyway.
// pos is read on the device, so one CUDA graph serves every position.
// One block per (b, h): it writes its T new keys and values, then for each query t scores the keys
// (a thread per key, q in shared memory), takes the softmax in shared memory, and sums the values
// with threads split over (D / 8 chunks) x (key groups), reduced in shared memory. It is the only
// block that touches its (b, h) rows of the cache, so the barrier after the writes is enough.
// Traffic per block: T*D of q, k, v and 2*(pos + T)*D of the cache read, T*D written, twice.
// 16-byte loads when D % 8 == 0 and every pointer is 16-byte aligned, else a scalar path.
// Test: pytest tests/test_kernels_cached_attention.py (CUDA tests need a GPU)
// Time: python kernels/bench.py --op=cached_attention
#include "common.cuh"

// shared memory: S scores + 9.3 KB of static arrays, under the 48 KB a launch gets by default
constexpr int kThreads = 256, kMaxHeadDim = 256, kMaxPositions = 8192;

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* scratch) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();  // scratch may still be read from the last call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < kThreads / 32 ? scratch[lane] : (is_max ? -INFINITY : 0.f);
    return is_max ? warp_max(v) : warp_sum(v);
}

template <typename T>
__global__ void cached_attention_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, T* __restrict__ cache_k,
                                        T* __restrict__ cache_v, const int64_t* __restrict__ pos,
                                        const bool* __restrict__ mask, T* __restrict__ y, int H,
                                        int T_new, int S, int D, long long mask_batch_stride,
                                        float scale, bool vec) {
    extern __shared__ float scores[];  // (S,) this query's
    // partial: (key groups, D) sums of p * v; groups * D <= kThreads * 8
    __shared__ float q_row[kMaxHeadDim], partial[kThreads * 8], scratch[32];
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const long long start = *pos;
    const size_t new_rows = (size_t)bh * T_new * D, cache_rows = (size_t)bh * S * D;
    for (int i = threadIdx.x; i < T_new * D; i += kThreads) {
        const int t = i / D;
        if (start + t < S) {
            cache_k[cache_rows + (start + t) * D + i % D] = k[new_rows + i];
            cache_v[cache_rows + (start + t) * D + i % D] = v[new_rows + i];
        }
    }
    __syncthreads();
    const int n_keys = (int)min((long long)S, start + T_new);
    const int chunk = vec ? 8 : 1, chunks = D / chunk, groups = kThreads / chunks;
    const T* keys = cache_k + cache_rows;
    const T* values = cache_v + cache_rows;
    for (int t = 0; t < T_new; t++) {
        const bool* allowed = mask + b * mask_batch_stride + (size_t)t * S;
        for (int d = threadIdx.x; d < D; d += kThreads)
            q_row[d] = to_float(q[new_rows + (size_t)t * D + d]) * scale;
        __syncthreads();
        float top = -INFINITY;
        for (int j = threadIdx.x; j < n_keys; j += kThreads) {
            float s = -INFINITY;
            if (allowed[j]) {
                s = 0.f;
                const T* key = keys + (size_t)j * D;
                if (vec) {
                    for (int d = 0; d < D; d += 8) {
                        float kv[8];
                        load8(key + d, kv);
#pragma unroll
                        for (int i = 0; i < 8; i++) s += q_row[d + i] * kv[i];
                    }
                } else {
                    for (int d = 0; d < D; d++) s += q_row[d] * to_float(key[d]);
                }
            }
            scores[j] = s;
            top = fmaxf(top, s);
        }
        top = block_reduce(top, true, scratch);
        float total = 0.f;
        for (int j = threadIdx.x; j < n_keys; j += kThreads) {
            const float p = scores[j] == -INFINITY ? 0.f : expf(scores[j] - top);
            scores[j] = p;
            total += p;
        }
        total = block_reduce(total, false, scratch);  // its barriers also publish scores
        const int c = threadIdx.x % chunks, g = threadIdx.x / chunks;
        float acc[8] = {};
        if (g < groups) {
            for (int j = g; j < n_keys; j += groups) {
                const float p = scores[j];
                if (p == 0.f) continue;
                const T* value = values + (size_t)j * D + c * chunk;
                if (vec) {
                    float vv[8];
                    load8(value, vv);
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[i] += p * vv[i];
                } else {
                    acc[0] += p * to_float(value[0]);
                }
            }
            for (int i = 0; i < chunk; i++) partial[g * D + c * chunk + i] = acc[i];
        }
        __syncthreads();
        for (int d = threadIdx.x; d < D; d += kThreads) {
            float sum = 0.f;
            for (int i = 0; i < groups; i++) sum += partial[i * D + d];
            // y (B, T, H, D): row (b, t), head h
            y[(((size_t)b * T_new + t) * H + h) * D + d] = from_float<T>(sum / total);
        }
        __syncthreads();  // q_row, scores and partial are reused by the next query
    }
}

void cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& pos,
                      const at::Tensor& mask, at::Tensor& y) {
    const int B = q.size(0), H = q.size(1), T_new = q.size(2), D = q.size(3);
    const int S = cache_k.size(2);
    TORCH_CHECK(D <= kMaxHeadDim && S <= kMaxPositions,
                "cached_attention takes head dim <= 256 and a cache of <= 8192 positions");
    TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                cache_k.is_contiguous() && cache_v.is_contiguous() && mask.is_contiguous() &&
                y.is_contiguous(), "cached_attention wants contiguous tensors");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && cache_k.scalar_type() == q.scalar_type() &&
                cache_v.scalar_type() == q.scalar_type(), "cached_attention wants one dtype");
    if (B * H * T_new == 0) return;
    const at::cuda::OptionalCUDAGuard guard(q.device());
    const bool vec = D % 8 == 0 && aligned16({q, k, v, cache_k, cache_v, y});
    const long long mask_batch_stride = mask.size(0) == 1 ? 0 : (long long)T_new * S;
    AVA_DISPATCH(q.scalar_type(), T, [&] {
        cached_attention_kernel<T><<<B * H, kThreads, S * sizeof(float), stream()>>>(
            ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(cache_k), ptr<T>(cache_v),
            ptr<int64_t>(pos), ptr<bool>(mask), ptr<T>(y), H, T_new, S, D, mask_batch_stride,
            1.f / sqrtf((float)D), vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
}

TORCH_LIBRARY_FRAGMENT(ava_cuda, m) {
    m.def("cached_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache_k, Tensor(b!) cache_v, "
          "Tensor pos, Tensor mask, Tensor(c!) y) -> ()", &cached_attention);
}
