// Helpers shared by Ava's kernels: fp32/bf16 conversion, vector loads and stores, warp
// reductions, and dtype dispatch. Every kernel computes in fp32 registers whatever the storage
// type.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <torch/extension.h>

#include <type_traits>

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) {
    return __float2bfloat16(v);
}

// 8 consecutive elements <-> 8 floats, as 16-byte accesses (one for bf16, two for fp32).
// The caller guarantees 16-byte alignment (see aligned16 below).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
    float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float (&v)[8]) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x; v[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16* p, const float (&v)[8]) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// E consecutive elements as stored (8, 16 or 32 bytes: one or two 8- or 16-byte loads), turned
// into floats where they are used, so rows kept in registers hold only their stored bytes: a bf16
// tile takes half the registers of an fp32 one. The caller guarantees the alignment of the load.
template <typename T, int E> struct Chunk {
    using Word = std::conditional_t<sizeof(T) * E == 8, uint2, uint4>;
    static constexpr int kWords = sizeof(T) * E / sizeof(Word);
    Word raw[kWords];
    __device__ __forceinline__ void load(const T* p) {
#pragma unroll
        for (int i = 0; i < kWords; i++) raw[i] = reinterpret_cast<const Word*>(p)[i];
    }
    __device__ __forceinline__ void floats(float (&f)[E]) const {
        if constexpr (std::is_same_v<T, float>) {
            const unsigned* u = reinterpret_cast<const unsigned*>(raw);
#pragma unroll
            for (int e = 0; e < E; e++) f[e] = __uint_as_float(u[e]);
        } else {
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(raw);
#pragma unroll
            for (int e = 0; e < E / 2; e++) {
                const float2 pair = __bfloat1622float2(h[e]);
                f[2 * e] = pair.x;
                f[2 * e + 1] = pair.y;
            }
        }
    }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// RMSNorm's scaling of one row by a warp: y = x * rstd * w over C elements (16-byte accesses when
// vec). The training norm and the fused decode norm share it, so they round alike.
template <typename Tx, typename Tw, typename Ty>
__device__ __forceinline__ void scale_row(const Tx* x, const Tw* w, Ty* y, int C, float rstd,
                                          bool vec) {
    const int lane = threadIdx.x % 32;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8], wv[8];
            load8(x + c, v);
            load8(w + c, wv);
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] *= rstd * wv[i];
            store8(y + c, v);
        }
    } else {
        for (int c = lane; c < C; c += 32) y[c] = from_float<Ty>(to_float(x[c]) * rstd *
                                                                 to_float(w[c]));
    }
}

// True when every tensor's data starts on a 16-byte boundary: rows of a multiple of 8 elements then
// stay aligned.
inline bool aligned16(std::initializer_list<at::Tensor> tensors) {
    for (const auto& t : tensors)
        if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
    return true;
}

inline int num_sms() {
    int device, count;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Runs the lambda body with T bound to the C++ element type of dtype (float or bf16).
#define AVA_DISPATCH(dtype, T, ...)                                                              \
    [&] {                                                                                        \
        if ((dtype) == at::kFloat) {                                                             \
            using T = float;                                                                     \
            return __VA_ARGS__();                                                                \
        }                                                                                        \
        TORCH_CHECK((dtype) == at::kBFloat16, "Ava kernels take float32 or bfloat16, got ",      \
                    dtype);                                                                      \
        using T = bf16;                                                                          \
        return __VA_ARGS__();                                                                    \
    }()

template <typename T> inline T* ptr(const at::Tensor& t) {
    return reinterpret_cast<T*>(t.data_ptr());
}
