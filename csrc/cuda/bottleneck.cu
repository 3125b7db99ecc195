// The bottleneck adapter on CUDA. Large batches run the projections on cuBLAS (from bindings.cpp) with the
// elementwise steps here (dropout from the shared hash, activation forward/backward in one pass). Small
// batches (decode) run two fused launches: down-projection + dropout + activation, then up-projection +
// scale + residual, with the bottleneck activations in fp32 between them.
#include "../dropout_hash.h"
#include "common.cuh"

namespace fastadapters {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerWarp = 8;  // rows of h (or a) each warp of the small-batch kernels carries
constexpr int kWarps = 8;

__device__ __forceinline__ float act_f(int act, float z) {
    switch (act) {
        case FA_TANH: return tanhf(z);
        case FA_RELU: return z > 0.0f ? z : 0.0f;
        case FA_GELU: return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
        case FA_SILU: return z / (1.0f + expf(-z));
        default: return 1.0f / (1.0f + expf(-z));  // FA_SIGMOID
    }
}

__device__ __forceinline__ float act_df(int act, float z) {
    switch (act) {
        case FA_TANH: {
            const float t = tanhf(z);
            return 1.0f - t * t;
        }
        case FA_RELU: return z > 0.0f ? 1.0f : 0.0f;
        case FA_GELU:
            return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
        case FA_SILU: {
            const float s = 1.0f / (1.0f + expf(-z));
            return s * (1.0f + z * (1.0f - s));
        }
        default: {
            const float s = 1.0f / (1.0f + expf(-z));
            return s * (1.0f - s);
        }
    }
}

// What a warp of the small-batch kernels owns: column `col` (blockIdx.y · kWarps + warp) for the rows
// r0 … r0 + nr - 1 of its row block (blockIdx.x), nr <= kRowsPerWarp.
struct WarpRows {
    int lane, nr;
    int64_t col, r0;
};

__device__ __forceinline__ WarpRows warp_rows(int64_t n) {
    WarpRows w;
    w.lane = threadIdx.x % 32;
    w.col = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
    w.r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerWarp;
    w.nr = static_cast<int>(n - w.r0 < kRowsPerWarp ? n - w.r0 : kRowsPerWarp);
    return w;
}

template <typename T>
__device__ __forceinline__ float read_scale(const void* scale_ptr, float scale) {
    return scale_ptr ? to_f(*static_cast<const T*>(scale_ptr)) : scale;
}

// `in` may be `out` (dh is masked in place): no __restrict__ on them.
template <typename T>
__global__ void dropout_kernel(const T* in, int64_t in_ld, int64_t n, int64_t d, uint32_t thr,
                               float inv, int64_t seed, T* out, int64_t out_ld) {
    const int64_t count = n * d;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t row = i / d, col = i - row * d;
        const bool kept = fa_col_hash(fa_row_key(seed, row), col) >= thr;
        out[row * out_ld + col] = from_f<T>(kept ? to_f(in[row * in_ld + col]) * inv : 0.0f);
    }
}

template <typename T>
__global__ void activation_kernel(int act, const T* __restrict__ z, T* __restrict__ a, int64_t count) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        a[i] = from_f<T>(act_f(act, to_f(z[i])));
}

template <typename T>
__global__ void activation_backward_kernel(int act, const T* __restrict__ g, const T* __restrict__ z,
                                           const void* scale_ptr, float scale, T* __restrict__ dz, T* __restrict__ a,
                                           int64_t count) {
    const float s = read_scale<T>(scale_ptr, scale);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float zi = to_f(z[i]);
        dz[i] = from_f<T>(s * to_f(g[i]) * act_df(act, zi));
        if (a) a[i] = from_f<T>(act_f(act, zi));
    }
}

// Warp (blockIdx.y · kWarps + warp) computes bottleneck column j for rows r0 … r0 + 7 (blockIdx.x): one read
// of D[j] serves the 8 rows; dropout is applied to h on the fly from the hash.
template <typename T>
__global__ void down_kernel(int act, const T* __restrict__ h, int64_t h_ld, int64_t n, int64_t d_in,
                            const T* __restrict__ down, int64_t b, uint32_t thr, float inv, int64_t seed,
                            T* __restrict__ z, float* __restrict__ a) {
    const WarpRows w = warp_rows(n);
    const int64_t j = w.col, r0 = w.r0;
    const int lane = w.lane, nr = w.nr;
    if (j >= b) return;
    const bool drop = seed >= 0;
    uint32_t keys[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) keys[r] = drop && r < nr ? fa_row_key(seed, r0 + r) : 0u;
    float acc[kRowsPerWarp] = {};
    const T* dr = down + j * d_in;
    for (int64_t k = lane; k < d_in; k += 32) {
        const float w = to_f(dr[k]);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
            if (r < nr) {
                float hv = to_f(h[(r0 + r) * h_ld + k]);
                if (drop) hv = fa_col_hash(keys[r], k) >= thr ? hv * inv : 0.0f;
                acc[r] += hv * w;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0 && r < nr) {
            const T zt = from_f<T>(v);
            z[(r0 + r) * b + j] = zt;
            a[(r0 + r) * b + j] = act_f(act, to_f(zt));  // from the stored z, as backward will see it
        }
    }
}

// Warp (blockIdx.y · kWarps + warp) computes output column o for rows r0 … r0 + 7: U[o] read once (coalesced).
template <typename T>
__global__ void up_kernel(const float* __restrict__ a, int64_t n, int64_t b, const T* __restrict__ up, int64_t d_out,
                          const void* scale_ptr, float scale, const T* __restrict__ res, int64_t res_ld,
                          T* __restrict__ out) {
    const WarpRows w = warp_rows(n);
    const int64_t o = w.col, r0 = w.r0;
    const int lane = w.lane, nr = w.nr;
    if (o >= d_out) return;
    float acc[kRowsPerWarp] = {};
    const T* ur = up + o * b;
    for (int64_t j = lane; j < b; j += 32) {
        const float w = to_f(ur[j]);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
            if (r < nr) acc[r] += a[(r0 + r) * b + j] * w;
    }
    const float s = read_scale<T>(scale_ptr, scale);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0 && r < nr) {
            const int64_t row = r0 + r;
            out[row * d_out + o] = from_f<T>(to_f(res[row * res_ld + o]) + s * v);
        }
    }
}

}  // namespace
}  // namespace cuda
}  // namespace fastadapters

using namespace fastadapters::cuda;
using fastadapters::fa_drop_threshold;

extern "C" int fa_dropout_apply(int dtype, const void* in, int64_t in_ld, int64_t n, int64_t d, float p, int64_t seed,
                                void* out, int64_t out_ld, void* stream) {
    if (n * d == 0) return 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const float inv = 1.0f / (1.0f - p);
    FA_DISPATCH_DTYPE(dtype, dropout_kernel<T><<<elementwise_blocks(n * d, kThreads), kThreads, 0, s>>>(
                                 static_cast<const T*>(in), in_ld, n, d, fa_drop_threshold(p), inv, seed,
                                 static_cast<T*>(out), out_ld));
    return last_error();
}

extern "C" int fa_activation(int dtype, int act, const void* z, void* a, int64_t count, void* stream) {
    if (count == 0) return 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    FA_DISPATCH_DTYPE(dtype, activation_kernel<T><<<elementwise_blocks(count, kThreads), kThreads, 0, s>>>(
                                 act, static_cast<const T*>(z), static_cast<T*>(a), count));
    return last_error();
}

extern "C" int fa_activation_backward(int dtype, int act, const void* g, const void* z, const void* scale_ptr,
                                      float scale, void* dz, void* a, int64_t count, void* stream) {
    if (count == 0) return 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    FA_DISPATCH_DTYPE(dtype, activation_backward_kernel<T><<<elementwise_blocks(count, kThreads), kThreads, 0, s>>>(
                                 act, static_cast<const T*>(g), static_cast<const T*>(z), scale_ptr, scale,
                                 static_cast<T*>(dz), static_cast<T*>(a), count));
    return last_error();
}

extern "C" int fa_bottleneck_down(int dtype, int act, const void* h, int64_t h_ld, int64_t n, int64_t d_in,
                                  const void* down, int64_t b, float p, int64_t seed, void* z, float* a,
                                  void* stream) {
    if (n == 0 || b == 0) return 0;
    const dim3 grid(ceil_div(n, kRowsPerWarp), ceil_div(b, kWarps));
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const bool drop = p > 0.0f && seed >= 0;
    const float inv = drop ? 1.0f / (1.0f - p) : 1.0f;
    FA_DISPATCH_DTYPE(dtype, down_kernel<T><<<grid, kWarps * 32, 0, s>>>(
                                 act, static_cast<const T*>(h), h_ld, n, d_in, static_cast<const T*>(down), b,
                                 fa_drop_threshold(p), inv, drop ? seed : -1, static_cast<T*>(z), a));
    return last_error();
}

extern "C" int fa_bottleneck_up(int dtype, const float* a, int64_t n, int64_t b, const void* up, int64_t d_out,
                                const void* scale_ptr, float scale, const void* residual, int64_t res_ld, void* out,
                                void* stream) {
    if (n == 0 || d_out == 0) return 0;
    const dim3 grid(ceil_div(n, kRowsPerWarp), ceil_div(d_out, kWarps));
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    FA_DISPATCH_DTYPE(dtype, up_kernel<T><<<grid, kWarps * 32, 0, s>>>(
                                 a, n, b, static_cast<const T*>(up), d_out, scale_ptr, scale,
                                 static_cast<const T*>(residual), res_ld, static_cast<T*>(out)));
    return last_error();
}
