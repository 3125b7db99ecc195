// The CPU kernels' entry points, on raw pointers (no torch types): csrc/bindings.cpp checks the tensors,
// prepares the small fp32 operands and calls these. Row-major everywhere; `*_ld` is a row stride in
// elements. n is the number of tokens (rows). Storage dtypes are given by `dt`; arithmetic is fp32.
#pragma once
#include <cstdint>

#include "../activations.h"
#include "vec.h"

namespace fastadapters {
namespace cpu {

// ---- LoRA linear (single and grouped): the low-rank part; the base GEMM stays in ATen ----

// One member of a (grouped) LoRA forward: y = bias + t[:, offset:offset+rank] · bt.
struct LoraOut {
    void* y;           // [n, d_out], written (the base GEMM is then accumulated into it)
    const float* bt;   // [rank, d_out]: scale · Bᵀ
    const float* bias; // [d_out] or nullptr
    int64_t d_out, rank, offset;
};

// t = drop(x) · at (one read of x, dropout fused), then every member's y = bias + t_i · bt_i.
// x: [n, d_in] (row stride x_ld); a: [R, d_in] fp32 (the concatenated A); t: [n, R] written.
void lora_forward(DType dt, const void* x, int64_t x_ld, int64_t n, int64_t d_in, const float* a, int64_t R,
                  void* t, const LoraOut* outs, int k, const Dropout& drop);

// One member of a (grouped) LoRA backward.
struct LoraGrad {
    const void* dy;   // [n, d_out] (row stride dy_ld)
    int64_t dy_ld;
    const float* bs;  // [d_out, rank]: scale · B
    float* dbt;       // [rank, d_out] written with Σ_rows t_iᵀ dy (unscaled), or nullptr when not needed
    int64_t d_out, rank, offset;
};

// One pass over the rows: ds = [dy_i · bs_i]_i, dbt_i = t_iᵀ dy_i, da = dsᵀ drop(x), dx = drop'(ds · a).
// a: [R, d_in] fp32 (the concatenated A); da: [R, d_in] fp32 or nullptr; dx: [n, d_in] or nullptr, written
// with the low-rank part only (the caller adds dy W).
void lora_backward(DType dt, const void* x, int64_t x_ld, int64_t n, int64_t d_in, const void* t, int64_t R,
                   const float* a, const LoraGrad* grads, int k, const Dropout& drop, float* da, void* dx);

// ---- multi-LoRA (serving): per-token adapter ids, no padding to the largest rank ----

// One member (q, k, v, …) of a multi-LoRA layer; per-adapter arrays have n_adapters entries.
struct MultiLoraMember {
    void* y;               // [n, d_out], written with bias + the token's adapter delta (the base GEMM then adds)
    const float* bank_b;   // [Σ_a rank_a, d_out]: rows b_off[a] : b_off[a] + rank_a hold B_aᵀ
    const float* bias;     // [d_out] or nullptr
    int64_t d_out;
    const int64_t* ranks;  // this member's rank per adapter (0: no LoRA there)
    const float* scales;
    const int64_t* b_off;  // first row of adapter a in bank_b
    const int64_t* t_col;  // first column of this member in adapter a's shrink output
};

// For the tokens of each adapter a (positions starts[a] : starts[a+1] of `order`, or of the identity when
// order is null; positions before starts[0] have no adapter): t = x_tok · bank_a[a_off[a] : +a_rows[a]]ᵀ
// once for all members, then y_m[tok] = bias_m + scale · t[:, t_col : t_col + rank] · B_{m,a}ᵀ.
// bank_a: [Σ_a a_rows[a], d_in] fp32.
void multi_lora_forward(DType dt, const void* x, int64_t x_ld, int64_t n, int64_t d_in, const float* bank_a,
                        const int64_t* a_off, const int64_t* a_rows, int64_t n_adapters, const int64_t* order,
                        const int64_t* starts, const MultiLoraMember* members, int k);

// ---- bottleneck adapter: out = residual + scale · f(drop(h) Dᵀ) Uᵀ ----

// tanh = 0, relu, gelu, silu, sigmoid: the codes of csrc/activations.h.
#define FA_ACTIVATION_ENUM(UPPER, lower) lower,
enum class Activation : int { FA_ACTIVATIONS(FA_ACTIVATION_ENUM) };
#undef FA_ACTIVATION_ENUM
#define FA_ACTIVATION_NAME(UPPER, lower) #lower,
inline constexpr const char* kActivationNames[] = {FA_ACTIVATIONS(FA_ACTIVATION_NAME)};
#undef FA_ACTIVATION_NAME
inline constexpr int kNumActivations = sizeof(kActivationNames) / sizeof(kActivationNames[0]);

// down: [b, d_in] fp32; up: [d_out, b] fp32; residual: [n, d_out] (row stride res_ld) or nullptr for h;
// out: [n, d_out] written; z: [n, b] written with the pre-activation (saved for backward).
void bottleneck_forward(DType dt, const void* h, int64_t h_ld, int64_t n, int64_t d_in, const float* down,
                        int64_t b, const float* up, int64_t d_out, float scale, Activation act, const Dropout& drop,
                        const void* residual, int64_t res_ld, void* out, void* z);

// From grad [n, d_out] and the saved z: dh [n, d_in] (plus grad when the residual was h), d_down [b, d_in] and
// d_up [d_out, b] in fp32, d_scale = Σ (grad·U) ⊙ f(z) (unscaled); each output may be nullptr (not needed).
void bottleneck_backward(DType dt, const void* grad, int64_t g_ld, const void* h, int64_t h_ld, int64_t n,
                         int64_t d_in, const float* down, int64_t b, const float* up, int64_t d_out, const void* z,
                         float scale, Activation act, const Dropout& drop, bool residual_is_h, void* dh,
                         float* d_down, float* d_up, double* d_scale);

}  // namespace cpu
}  // namespace fastadapters
