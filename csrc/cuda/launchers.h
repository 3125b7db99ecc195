// The C interface between csrc/bindings.cpp and the CUDA kernels. Plain C types only: the .cu files include
// no torch header (they compile with nvcc in seconds and against any torch), and bindings.cpp includes no
// CUDA kernel code. Every launcher enqueues on `stream` (a cudaStream_t) and returns a cudaError_t as int
// (0 = success). Row-major tensors; `*_ld` is a row stride in elements. dtype: FA_F32, FA_F16, FA_BF16.
#pragma once
#include <stdint.h>

#include "../activations.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { FA_F32 = 0, FA_F16 = 1, FA_BF16 = 2 };
// FA_TANH = 0, FA_RELU, FA_GELU, FA_SILU, FA_SIGMOID (csrc/activations.h), then their count.
#define FA_ACTIVATION_CODE(UPPER, lower) FA_##UPPER,
enum { FA_ACTIVATIONS(FA_ACTIVATION_CODE) FA_NUM_ACTIVATIONS };
#undef FA_ACTIVATION_CODE
#define FA_MAX_MEMBERS 8

const char* fa_cuda_error_string(int err);

// ---- multi-LoRA: y[i] += s_a · (x[i] A_aᵀ) B_aᵀ, a = adapter_ids[i] (outside [0, n_adapters): nothing) ----

// t[tok, 0 : a_rows[a]] = x[tok] · bank_a[a_off[a] : a_off[a] + a_rows[a]]ᵀ (fp32 out), for every token, in the
// order given by `order` (sorted by adapter, so neighbouring warps share A rows; NULL = 0..n-1).
// Work per token is proportional to its own a_rows (no padding to the largest rank).
int fa_multi_lora_shrink(int dtype, const void* x, int64_t x_ld, int64_t n, int64_t d_in, const int64_t* adapter_ids,
                         const int64_t* order, const void* bank_a, const int64_t* a_off, const int64_t* a_rows,
                         int64_t n_adapters, int64_t max_rows, float* t, int64_t t_ld, void* stream);

// The members (q, k, v, …) of one expand launch.
typedef struct {
    void* y[FA_MAX_MEMBERS];             // [n, d_out] base outputs, updated in place
    const void* bank_b[FA_MAX_MEMBERS];  // [Σ_a rank, d_out]: rows b_off : b_off + rank hold B_aᵀ
    int64_t d_out[FA_MAX_MEMBERS];
    int64_t y_ld[FA_MAX_MEMBERS];
} fa_expand_members;

// y_m[tok] += scales[m·n+a] · t[tok, t_col[m·n+a] : +ranks[m·n+a]] · B_{m,a}ᵀ for each member m < k.
// ranks, scales, b_off, t_col: device arrays of k·n_adapters entries (member-major).
int fa_multi_lora_expand(int dtype, const float* t, int64_t t_ld, int64_t n, const int64_t* adapter_ids,
                         const int64_t* order, int64_t n_adapters, int k, const fa_expand_members* members,
                         const int64_t* ranks, const float* scales, const int64_t* b_off, const int64_t* t_col,
                         int64_t max_dout, void* stream);

// ---- bottleneck adapter: out = residual + scale · f(drop(h) Dᵀ) Uᵀ ----
// `scale_ptr` (a device fp32/fp16/bf16 scalar of the op's dtype, the learned scale) overrides `scale` when not NULL.

// out[r, c] = in[r, c] · keep(r, c) / (1 - p), keep from the CPU kernels' hash (csrc/dropout_hash.h);
// out may be in (same strides).
int fa_dropout_apply(int dtype, const void* in, int64_t in_ld, int64_t n, int64_t d, float p, int64_t seed, void* out,
                     int64_t out_ld, void* stream);

// a = f(z) elementwise over count elements (z, a of `dtype`).
int fa_activation(int dtype, int act, const void* z, void* a, int64_t count, void* stream);

// From g = grad·U and z (both [count] of `dtype`): dz = scale · g ⊙ f'(z) and a = f(z).
int fa_activation_backward(int dtype, int act, const void* g, const void* z, const void* scale_ptr, float scale,
                           void* dz, void* a, int64_t count, void* stream);

// Small batches (decode): z = drop(h) Dᵀ and a = f(z) in one launch (z in `dtype`, a in fp32 [n, b]).
int fa_bottleneck_down(int dtype, int act, const void* h, int64_t h_ld, int64_t n, int64_t d_in, const void* down,
                       int64_t b, float p, int64_t seed, void* z, float* a, void* stream);

// Small batches: out = residual + scale · a Uᵀ in one launch (a fp32 [n, b]; residual and out of `dtype`).
int fa_bottleneck_up(int dtype, const float* a, int64_t n, int64_t b, const void* up, int64_t d_out,
                     const void* scale_ptr, float scale, const void* residual, int64_t res_ld, void* out,
                     void* stream);

#ifdef __cplusplus
}
#endif
