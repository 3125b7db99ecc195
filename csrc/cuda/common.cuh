// Shared by the .cu files: dtype conversion, warp reduction, dtype dispatch. No torch header.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace fastadapters {
namespace cuda {

// fp32 <-> storage type T, one specialisation per dtype (round to nearest even on the way back).
template <typename T>
struct Storage;
template <>
struct Storage<float> {
    static __device__ __forceinline__ float to_f(float v) { return v; }
    static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <>
struct Storage<__half> {
    static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Storage<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
    return Storage<T>::to_f(v);
}
template <typename T>
__device__ __forceinline__ T from_f(float v) {
    return Storage<T>::from_f(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

// Grid size of a grid-stride elementwise loop.
inline unsigned int elementwise_blocks(int64_t count, int threads) {
    const int64_t blocks = (count + threads - 1) / threads;
    return static_cast<unsigned int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

inline int last_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace cuda
}  // namespace fastadapters

// Runs the statement with `T` bound to the storage type of `dtype` (FA_F32, FA_F16, FA_BF16).
#define FA_DISPATCH_DTYPE(dtype, ...)                      \
    switch (dtype) {                                       \
        case FA_F32: {                                     \
            using T = float;                               \
            __VA_ARGS__;                                   \
            break;                                         \
        }                                                  \
        case FA_F16: {                                     \
            using T = __half;                              \
            __VA_ARGS__;                                   \
            break;                                         \
        }                                                  \
        case FA_BF16: {                                    \
            using T = __nv_bfloat16;                       \
            __VA_ARGS__;                                   \
            break;                                         \
        }                                                  \
        default:                                           \
            return static_cast<int>(cudaErrorInvalidValue); \
    }
