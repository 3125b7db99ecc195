// Multi-LoRA shrink and expand for serving: one launch each per layer for any mix of adapters and ranks.
// Tokens are visited in adapter-sorted order (neighbouring warps then read the same A/B rows from cache);
// a token costs work in proportion to its own adapter's rank. fp32 accumulation for every dtype.
#include "common.cuh"

namespace fastadapters {
namespace cuda {
namespace {

constexpr int kShrinkWarps = 8;  // sorted positions per shrink block, one warp each
constexpr int kShrinkCols = 8;   // shrink output columns per warp (blockIdx.y picks the column group)
constexpr int kExpandThreads = 256;
constexpr int kExpandTokens = 4;  // sorted positions per expand block

template <typename T>
__global__ void shrink_kernel(const T* __restrict__ x, int64_t x_ld, int64_t n, int64_t d_in,
                              const int64_t* __restrict__ ids, const int64_t* __restrict__ order,
                              const T* __restrict__ bank_a, const int64_t* __restrict__ a_off,
                              const int64_t* __restrict__ a_rows, int64_t n_adapters, float* __restrict__ t,
                              int64_t t_ld) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t pos = static_cast<int64_t>(blockIdx.x) * kShrinkWarps + warp;
    if (pos >= n) return;
    const int64_t tok = order ? order[pos] : pos;
    const int64_t a = ids[tok];
    if (a < 0 || a >= n_adapters) return;
    const int64_t rows = a_rows[a];
    const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kShrinkCols;
    if (c0 >= rows) return;  // a lower-rank adapter: this column group has no work
    const int nc = static_cast<int>(rows - c0 < kShrinkCols ? rows - c0 : kShrinkCols);
    const T* xr = x + tok * x_ld;
    const T* ar = bank_a + (a_off[a] + c0) * d_in;
    float acc[kShrinkCols];
#pragma unroll
    for (int j = 0; j < kShrinkCols; ++j) acc[j] = 0.0f;
    for (int64_t k = lane; k < d_in; k += 32) {
        const float xv = to_f(xr[k]);
#pragma unroll
        for (int j = 0; j < kShrinkCols; ++j)
            if (j < nc) acc[j] += xv * to_f(ar[j * d_in + k]);
    }
#pragma unroll
    for (int j = 0; j < kShrinkCols; ++j) {
        const float v = warp_sum(acc[j]);
        if (lane == 0 && j < nc) t[tok * t_ld + c0 + j] = v;
    }
}

template <typename T>
__global__ void expand_kernel(const float* __restrict__ t, int64_t t_ld, int64_t n, const int64_t* __restrict__ ids,
                              const int64_t* __restrict__ order, int64_t n_adapters, fa_expand_members members,
                              const int64_t* __restrict__ ranks, const float* __restrict__ scales,
                              const int64_t* __restrict__ b_off, const int64_t* __restrict__ t_col) {
    const int m = blockIdx.z;
    const int64_t d_out = members.d_out[m];
    const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
    if (o >= d_out) return;
    const T* bank_b = static_cast<const T*>(members.bank_b[m]);
    T* y = static_cast<T*>(members.y[m]);
    for (int p = 0; p < kExpandTokens; ++p) {
        const int64_t pos = static_cast<int64_t>(blockIdx.x) * kExpandTokens + p;
        if (pos >= n) return;
        const int64_t tok = order ? order[pos] : pos;
        const int64_t a = ids[tok];
        if (a < 0 || a >= n_adapters) continue;
        const int64_t idx = m * n_adapters + a;
        const int64_t r = ranks[idx];
        if (r == 0) continue;
        const float* tr = t + tok * t_ld + t_col[idx];
        const T* br = bank_b + b_off[idx] * d_out + o;  // coalesced: threads read consecutive columns
        float acc = 0.0f;
        for (int64_t j = 0; j < r; ++j) acc += tr[j] * to_f(br[j * d_out]);
        T* yo = y + tok * members.y_ld[m] + o;
        *yo = from_f<T>(to_f(*yo) + scales[idx] * acc);
    }
}

}  // namespace
}  // namespace cuda
}  // namespace fastadapters

using namespace fastadapters::cuda;

extern "C" const char* fa_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

extern "C" int fa_multi_lora_shrink(int dtype, const void* x, int64_t x_ld, int64_t n, int64_t d_in,
                                    const int64_t* adapter_ids, const int64_t* order, const void* bank_a,
                                    const int64_t* a_off, const int64_t* a_rows, int64_t n_adapters, int64_t max_rows,
                                    float* t, int64_t t_ld, void* stream) {
    if (n == 0 || max_rows == 0) return 0;
    const dim3 grid(ceil_div(n, kShrinkWarps), ceil_div(max_rows, kShrinkCols));
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    FA_DISPATCH_DTYPE(dtype, shrink_kernel<T><<<grid, kShrinkWarps * 32, 0, s>>>(
                                 static_cast<const T*>(x), x_ld, n, d_in, adapter_ids, order,
                                 static_cast<const T*>(bank_a), a_off, a_rows, n_adapters, t, t_ld));
    return last_error();
}

extern "C" int fa_multi_lora_expand(int dtype, const float* t, int64_t t_ld, int64_t n, const int64_t* adapter_ids,
                                    const int64_t* order, int64_t n_adapters, int k, const fa_expand_members* members,
                                    const int64_t* ranks, const float* scales, const int64_t* b_off,
                                    const int64_t* t_col, int64_t max_dout, void* stream) {
    if (n == 0 || max_dout == 0 || k == 0) return 0;
    if (k > FA_MAX_MEMBERS) return static_cast<int>(cudaErrorInvalidValue);
    const dim3 grid(ceil_div(n, kExpandTokens), ceil_div(max_dout, kExpandThreads), static_cast<unsigned int>(k));
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    FA_DISPATCH_DTYPE(dtype, expand_kernel<T><<<grid, kExpandThreads, 0, s>>>(
                                 t, t_ld, n, adapter_ids, order, n_adapters, *members, ranks, scales, b_off, t_col));
    return last_error();
}
